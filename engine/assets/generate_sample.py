"""Writes biomed_clinical_sample.jsonl: the demo's bundled corpus, synthetic and reproducible.

Every record is invented from the lists below with a fixed seed: PubMed-style structured abstracts
and MIMIC-style clinical notes (discharge summaries, progress notes, radiology and echo reports).
Nothing is copied from a real publication and nothing describes a real patient; names, dates and
places appear only as de-identification placeholders in MIMIC's ``[** ... **]`` form.

    python engine/assets/generate_sample.py   # rewrites the .jsonl beside this file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CONDITIONS = [
    ("type 2 diabetes mellitus", "metformin", "glycated haemoglobin"),
    ("chronic obstructive pulmonary disease", "tiotropium", "forced expiratory volume in one second"),
    ("heart failure with reduced ejection fraction", "sacubitril-valsartan", "left ventricular ejection fraction"),
    ("atrial fibrillation", "apixaban", "time in therapeutic range"),
    ("community-acquired pneumonia", "ceftriaxone", "time to clinical stability"),
    ("sepsis", "piperacillin-tazobactam", "serum lactate"),
    ("chronic kidney disease", "dapagliflozin", "estimated glomerular filtration rate"),
    ("rheumatoid arthritis", "methotrexate", "disease activity score"),
    ("major depressive disorder", "sertraline", "Hamilton depression rating"),
    ("asthma", "budesonide-formoterol", "peak expiratory flow"),
    ("hypertension", "amlodipine", "systolic blood pressure"),
    ("acute ischaemic stroke", "alteplase", "modified Rankin scale score"),
    ("non-small cell lung cancer", "pembrolizumab", "progression-free survival"),
    ("hepatocellular carcinoma", "sorafenib", "overall survival"),
    ("breast cancer", "trastuzumab", "pathological complete response"),
    ("Crohn's disease", "infliximab", "endoscopic remission"),
    ("psoriasis", "secukinumab", "psoriasis area and severity index"),
    ("osteoporosis", "denosumab", "bone mineral density"),
    ("HIV infection", "dolutegravir", "viral suppression"),
    ("tuberculosis", "rifampicin", "sputum culture conversion"),
    ("multiple sclerosis", "ocrelizumab", "annualised relapse rate"),
    ("Parkinson's disease", "levodopa", "motor fluctuation"),
    ("acute kidney injury", "intravenous crystalloid", "serum creatinine"),
    ("venous thromboembolism", "enoxaparin", "recurrent thrombosis"),
    ("gout", "allopurinol", "serum urate"),
    ("migraine", "erenumab", "monthly migraine days"),
    ("obstructive sleep apnoea", "continuous positive airway pressure", "apnoea-hypopnoea index"),
    ("cirrhosis", "rifaximin", "hepatic encephalopathy episodes"),
]
GENES = [
    "BRCA1",
    "TP53",
    "EGFR",
    "KRAS",
    "APOE",
    "CFTR",
    "HLA-B*57:01",
    "JAK2",
    "PCSK9",
    "TNF",
    "IL6",
    "ACE2",
    "MTHFR",
    "CYP2C19",
    "VEGFA",
    "PD-L1",
    "HER2",
    "ALK",
    "BRAF V600E",
    "FTO",
]
DESIGNS = [
    "a randomised, double-blind, placebo-controlled trial",
    "a prospective cohort study",
    "a retrospective cohort study",
    "a multicentre observational study",
    "a case-control study",
    "a systematic review and meta-analysis",
    "a cross-sectional survey",
    "a pragmatic randomised trial",
    "a nested case-control analysis",
    "a single-centre pilot study",
]
SETTINGS = [
    "tertiary referral hospitals",
    "primary care practices",
    "intensive care units",
    "community health centres",
    "academic medical centres",
    "outpatient clinics",
    "emergency departments",
]
POPULATIONS = [
    "adults",
    "older adults",
    "children",
    "postmenopausal women",
    "patients on haemodialysis",
    "patients admitted to hospital",
    "patients with obesity",
    "smokers",
    "pregnant women",
]
ADJECTIVES = ["significant", "modest", "marked", "clinically meaningful", "sustained", "dose-dependent"]
SITES = ["right lower lobe", "left upper lobe", "lingula", "right middle lobe", "left lower lobe"]
SYMPTOMS = [
    "shortness of breath",
    "chest pain",
    "fever",
    "productive cough",
    "abdominal pain",
    "nausea",
    "dizziness",
    "palpitations",
    "lower extremity oedema",
    "confusion",
    "fatigue",
    "dysuria",
    "headache",
]
EXAM = [
    "Lungs with crackles at the bases bilaterally.",
    "Heart regular rate and rhythm, no murmurs.",
    "Abdomen soft, non-tender, non-distended, bowel sounds present.",
    "Trace pitting oedema of both ankles.",
    "Alert and oriented to person, place and time.",
    "Mucous membranes dry.",
    "JVP elevated to 10 cm.",
    "Decreased breath sounds at the right base.",
    "No focal neurological deficit.",
    "Skin warm and well perfused.",
]
LABS = [
    ("WBC", 4.0, 18.0, "K/uL"),
    ("Hgb", 7.5, 15.5, "g/dL"),
    ("Plt", 90, 420, "K/uL"),
    ("Na", 128, 146, "mEq/L"),
    ("K", 3.1, 5.6, "mEq/L"),
    ("Cr", 0.6, 3.4, "mg/dL"),
    ("BUN", 8, 64, "mg/dL"),
    ("Glucose", 72, 340, "mg/dL"),
    ("Lactate", 0.8, 4.9, "mmol/L"),
    ("Troponin T", 0.01, 0.48, "ng/mL"),
    ("INR", 0.9, 3.2, ""),
    ("BNP", 40, 2400, "pg/mL"),
]
DRUGS = [
    "aspirin 81 mg daily",
    "atorvastatin 40 mg nightly",
    "metoprolol succinate 50 mg daily",
    "furosemide 40 mg twice daily",
    "lisinopril 10 mg daily",
    "insulin glargine 20 units at bedtime",
    "pantoprazole 40 mg daily",
    "levothyroxine 75 mcg daily",
    "albuterol inhaler as needed",
    "apixaban 5 mg twice daily",
    "vancomycin per pharmacy dosing",
    "acetaminophen 650 mg every 6 hours as needed",
    "heparin 5000 units subcutaneously three times daily",
    "prednisone 40 mg daily for 5 days",
]
SERVICES = ["MEDICINE", "CARDIOLOGY", "NEUROLOGY", "SURGERY", "MICU", "CSRU", "ORTHOPAEDICS"]


def _pct(rng: random.Random, lo: float, hi: float) -> str:
    return f"{rng.uniform(lo, hi):.1f}%"


def _ci(rng: random.Random) -> str:
    point = rng.uniform(0.55, 1.6)
    return f"{point:.2f} (95% CI {point * rng.uniform(0.7, 0.9):.2f}-{point * rng.uniform(1.1, 1.35):.2f})"


def abstract(rng: random.Random) -> str:
    condition, drug, outcome = rng.choice(CONDITIONS)
    design, setting, population = rng.choice(DESIGNS), rng.choice(SETTINGS), rng.choice(POPULATIONS)
    n = rng.choice([48, 120, 236, 512, 1024, 2310, 4876, 12650])
    weeks = rng.choice([12, 24, 26, 48, 52, 96])
    gene = rng.choice(GENES)
    background = rng.choice(
        [
            f"{condition.capitalize()} remains a leading cause of morbidity among {population}, and the benefit of {drug} "
            f"on {outcome} in routine practice is uncertain.",
            f"Evidence on whether {drug} improves {outcome} in {population} with {condition} is limited and conflicting.",
            f"Variants in {gene} have been associated with the risk of {condition}, but their effect on the response to "
            f"{drug} has not been established.",
        ]
    )
    methods = (
        f"We conducted {design} in {rng.randint(3, 41)} {setting}. A total of {n} {population} with {condition} "
        f"were {'randomly assigned to ' + drug + ' or placebo' if 'random' in design else 'followed'} for {weeks} "
        f"weeks. The primary outcome was the change in {outcome}; secondary outcomes included hospital admission, "
        f"adverse events and quality of life. Analyses were adjusted for age, sex, body-mass index and baseline "
        f"{outcome}."
    )
    effect = rng.choice(ADJECTIVES)
    results = (
        f"The mean age of participants was {rng.uniform(38, 79):.1f} years and {_pct(rng, 31, 68)} were women. "
        f"Treatment with {drug} was associated with a {effect} improvement in {outcome} (adjusted hazard ratio "
        f"{_ci(rng)}). Hospital admission occurred in {_pct(rng, 2, 19)} of the treated group and {_pct(rng, 4, 24)} "
        f"of the comparison group. Serious adverse events were reported in {_pct(rng, 1, 12)} of participants; "
        f"{rng.choice(['hypoglycaemia', 'nausea', 'rash', 'elevated liver enzymes', 'headache', 'dizziness'])} "
        f"was the most frequent."
    )
    if rng.random() < 0.3:
        results += (
            f" Carriers of the {gene} risk allele showed a {rng.choice(ADJECTIVES)} attenuation of the "
            f"treatment effect (P for interaction = {rng.uniform(0.001, 0.2):.3f})."
        )
    conclusions = rng.choice(
        [
            f"In {population} with {condition}, {drug} improved {outcome} with an acceptable safety profile.",
            f"These findings support further trials of {drug} in {population} with {condition}.",
            f"{drug.capitalize()} did not reduce hospital admission, although {outcome} improved; longer follow-up is needed.",
        ]
    )
    title = rng.choice(
        [
            f"{drug.capitalize()} and {outcome} in {population} with {condition}: {design.split(',')[0].replace('a ', '')}",
            f"Effect of {drug} on {outcome} among {population} with {condition}",
            f"{gene} genotype, {drug} response and {condition}",
        ]
    )
    return f"{title}. BACKGROUND: {background} METHODS: {methods} RESULTS: {results} CONCLUSIONS: {conclusions}"


def _labs(rng: random.Random, k: int) -> str:
    out = []
    for name, lo, hi, unit in rng.sample(LABS, k):
        value = rng.uniform(lo, hi)
        out.append(f"{name} {value:.1f}{' ' + unit if unit else ''}" if hi < 20 else f"{name} {value:.0f} {unit}")
    return ", ".join(out)


def discharge_summary(rng: random.Random) -> str:
    condition, drug, _ = rng.choice(CONDITIONS)
    age, sex = rng.randint(24, 93), rng.choice(["M", "F"])
    pronoun = "He" if sex == "M" else "She"
    symptoms = rng.sample(SYMPTOMS, 3)
    days = rng.randint(2, 14)
    meds = rng.sample(DRUGS, rng.randint(3, 6))
    return (
        f"Admission Date: [**2150-{rng.randint(1, 12)}-{rng.randint(1, 28)}**] Discharge Date: [**2150-{rng.randint(1, 12)}-"
        f"{rng.randint(1, 28)}**] Sex: {sex} Service: {rng.choice(SERVICES)} "
        f"Chief Complaint: {symptoms[0]}. "
        f"History of Present Illness: {age} year old {'man' if sex == 'M' else 'woman'} with a history of {condition} "
        f"and {rng.choice(CONDITIONS)[0]} who presented to the [**Hospital 1234**] emergency department with {days} days "
        f"of {symptoms[0]}, {symptoms[1]} and {symptoms[2]}. {pronoun} was seen by Dr. [**Last Name (STitle) 5678**] "
        f"in clinic last week. In the ED, vitals were T {rng.uniform(36.2, 39.6):.1f} HR {rng.randint(58, 132)} "
        f"BP {rng.randint(88, 178)}/{rng.randint(48, 102)} RR {rng.randint(12, 32)} O2 sat {rng.randint(86, 100)}% on "
        f"{rng.choice(['room air', '2L nasal cannula', '4L nasal cannula', 'non-rebreather'])}. "
        f"Physical Exam: {' '.join(rng.sample(EXAM, 4))} "
        f"Pertinent Results: {_labs(rng, 6)}. "
        f"Brief Hospital Course: {pronoun} was admitted for management of {condition}. {pronoun} was started on {drug} "
        f"with {rng.choice(['gradual', 'prompt', 'partial', 'steady'])} improvement of {symptoms[0]}. "
        f"{rng.choice(['Blood cultures remained negative.', 'Renal function returned to baseline.', 'Telemetry showed no arrhythmia.', 'Physical therapy evaluated the patient and recommended home with services.'])} "
        f"Discharge Medications: {'; '.join(meds)}. "
        f"Discharge Disposition: {rng.choice(['Home', 'Home with services', 'Extended care facility'])}. "
        f"Discharge Diagnosis: {condition}. Followup Instructions: follow up with Dr. [**First Name (STitle) 910**] "
        f"in {rng.randint(1, 4)} weeks."
    )


def progress_note(rng: random.Random) -> str:
    condition, drug, outcome = rng.choice(CONDITIONS)
    return (
        f"Progress note, hospital day {rng.randint(1, 12)}. S: Patient reports {rng.choice(['less', 'unchanged', 'worsening'])} "
        f"{rng.choice(SYMPTOMS)} overnight; slept {rng.choice(['well', 'poorly', 'intermittently'])}. "
        f"O: T {rng.uniform(36.0, 38.9):.1f} HR {rng.randint(60, 118)} BP {rng.randint(96, 164)}/{rng.randint(52, 94)} "
        f"I/O {rng.randint(900, 2800)}/{rng.randint(700, 3200)}. {' '.join(rng.sample(EXAM, 3))} Labs: {_labs(rng, 4)}. "
        f"A/P: {condition}, {rng.choice(['improving', 'stable', 'not yet at goal'])}. Continue {drug}; monitor {outcome}. "
        f"{rng.choice(['Wean oxygen as tolerated.', 'Check electrolytes in the morning and replete potassium to goal above 4.', 'Discussed plan with the patient and the family; code status full.', 'Consult renal for further recommendations.'])}"
    )


def imaging_report(rng: random.Random) -> str:
    site = rng.choice(SITES)
    if rng.random() < 0.5:
        return (
            f"CHEST (PA AND LAT) Reason: evaluate for {rng.choice(['pneumonia', 'effusion', 'interval change', 'line placement'])}. "
            f"FINDINGS: {rng.choice(['There is a new opacity in the', 'Patchy airspace consolidation is seen in the', 'No focal consolidation; minimal atelectasis in the'])} "
            f"{site}. {rng.choice(['Small bilateral pleural effusions.', 'No pleural effusion or pneumothorax.', 'Moderate right pleural effusion, increased.'])} "
            f"The cardiomediastinal silhouette is {rng.choice(['normal', 'enlarged', 'stable'])}. "
            f"IMPRESSION: {rng.choice(['Findings consistent with pneumonia in the appropriate clinical setting.', 'Mild pulmonary vascular congestion.', 'No acute cardiopulmonary process.'])}"
        )
    ef = rng.randint(15, 70)
    return (
        f"ECHOCARDIOGRAM. Indication: {rng.choice(['dyspnoea', 'heart failure', 'murmur', 'atrial fibrillation'])}. "
        f"The left atrium is {rng.choice(['normal in size', 'mildly dilated', 'moderately dilated'])}. Left ventricular "
        f"wall thickness is normal. Overall left ventricular systolic function is "
        f"{'severely depressed' if ef < 30 else 'mildly depressed' if ef < 50 else 'normal'} (LVEF {ef}%). "
        f"{rng.choice(['Mild mitral regurgitation.', 'Trace aortic regurgitation.', 'Moderate tricuspid regurgitation.'])} "
        f"Estimated pulmonary artery systolic pressure is {rng.randint(22, 64)} mmHg. "
        f"IMPRESSION: {'Reduced' if ef < 50 else 'Preserved'} biventricular systolic function."
    )


KINDS = [
    ("pubmed_abstract", abstract, 0.45),
    ("discharge_summary", discharge_summary, 0.25),
    ("progress_note", progress_note, 0.18),
    ("imaging_report", imaging_report, 0.12),
]


def generate(n_records: int = 400, seed: int = 20261121) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n_records):
        kind, make, _ = rng.choices(KINDS, weights=[w for *_, w in KINDS])[0]
        records.append({"id": f"{kind}-{i:05d}", "source": kind, "text": make(rng)})
    return records


if __name__ == "__main__":
    out = Path(__file__).with_name("biomed_clinical_sample.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for record in generate():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
