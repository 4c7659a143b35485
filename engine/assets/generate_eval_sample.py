"""Writes the bundled downstream sample sets under eval/, synthetic and reproducible (a fixed seed):

- eval/ner/{train,devel,test}.tsv: disease and chemical mentions in BioBERT's NER format (token<TAB>label,
  IOB2 with B-Disease / I-Disease / B-Chemical / I-Chemical, a blank line between sentences);
- eval/triage/{train,dev,test}.jsonl: clinical sentences ({"text", "label"}) to be sorted by the body
  system they concern (cardiovascular, respiratory, neurological, gastrointestinal).

Every sentence is invented from the lists below; nothing is copied from a publication and nothing
describes a real patient. A third of the disease and chemical names (and of the symptom phrases) occur
only in the test split, so a model must generalise from context and word form, not memorise names.

    python engine/assets/generate_eval_sample.py   # rewrites eval/ beside this file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DISEASES = [
    "type 2 diabetes mellitus", "atrial fibrillation", "chronic kidney disease", "heart failure", "asthma",
    "rheumatoid arthritis", "community-acquired pneumonia", "sepsis", "hypertension", "ischaemic stroke",
    "psoriasis", "ulcerative colitis", "Crohn disease", "multiple sclerosis", "Parkinson disease",
    "hepatocellular carcinoma", "acute pancreatitis", "pulmonary embolism", "migraine", "osteoporosis",
    "non-small cell lung cancer", "acute myeloid leukaemia", "systemic lupus erythematosus", "gout",
    "diabetic nephropathy", "cystic fibrosis", "tuberculosis", "Alzheimer disease", "endometriosis",
    "glioblastoma", "hypothyroidism", "peptic ulcer disease",
]  # fmt: skip
CHEMICALS = [
    "metformin", "apixaban", "dapagliflozin", "furosemide", "budesonide", "methotrexate", "ceftriaxone",
    "vancomycin", "amlodipine", "alteplase", "adalimumab", "mesalazine", "infliximab", "levodopa",
    "sorafenib", "octreotide", "heparin", "sumatriptan", "alendronate", "pembrolizumab", "cytarabine",
    "hydroxychloroquine", "allopurinol", "lisinopril", "ivacaftor", "rifampicin", "donepezil",
    "dienogest", "temozolomide", "levothyroxine", "omeprazole", "cisplatin", "valproic acid",
    "insulin glargine", "mycophenolate mofetil", "acetylsalicylic acid", "tranexamic acid", "zoledronic acid",
]  # fmt: skip
NER_TEMPLATES = [
    "Patients with {D} were randomised to {C} or placebo .",
    "{C} reduced the risk of hospitalisation in adults with {D} .",
    "We describe a case of {D} that responded to {C} .",
    "Long-term {C} therapy was associated with fewer relapses of {D} .",
    "The incidence of {D} did not differ between groups .",
    "Serum concentrations of {C} were measured at baseline and at 12 weeks .",
    "{D} is a common cause of morbidity in older adults .",
    "Treatment with {C} was stopped because of worsening {D} .",
    "A history of {D} was recorded in 14 % of participants .",
    "Combination of {C} and {C} improved outcomes in {D} .",
    "No patient discontinued {C} during follow-up .",
    "The cohort comprised 312 adults and 48 children .",
    "Adverse events were mild and resolved without intervention .",
    "Risk factors for {D} included age , smoking and obesity .",
]  # fmt: skip

SYSTEMS = {
    "cardiovascular": [
        "crushing central chest pain", "palpitations at rest", "an irregularly irregular pulse",
        "bilateral ankle oedema", "a new systolic murmur", "ST elevation in the anterior leads",
        "orthopnoea and paroxysmal nocturnal dyspnoea", "a blood pressure of 190/110", "syncope on exertion",
    ],
    "respiratory": [
        "a productive cough with green sputum", "wheeze on expiration", "oxygen saturation of 86 % on air",
        "right basal crackles", "haemoptysis", "pleuritic chest pain on inspiration",
        "a respiratory rate of 32", "reduced air entry on the left", "nocturnal cough and breathlessness",
    ],
    "neurological": [
        "left-sided facial droop", "slurred speech since this morning", "a first generalised seizure",
        "sudden severe occipital headache", "weakness of the right arm", "new confusion and disorientation",
        "double vision on lateral gaze", "numbness in both feet", "a resting tremor of the left hand",
    ],
    "gastrointestinal": [
        "epigastric pain radiating to the back", "coffee-ground vomiting", "melaena for two days",
        "right upper quadrant tenderness", "bloody diarrhoea", "abdominal distension and no bowel sounds",
        "jaundice and pale stools", "difficulty swallowing solids", "rebound tenderness in the right iliac fossa",
    ],
}  # fmt: skip
TRIAGE_TEMPLATES = [
    "Patient presented to the emergency department with {S} .",
    "On examination there was {S} .",
    "Seen in clinic today ; reports {S} for the past week .",
    "Admitted overnight with {S} , now stable .",
    "Referred by the general practitioner because of {S} .",
    "Nursing staff noted {S} during the night .",
    "She describes {S} , worse over the last 48 hours .",
    "Review requested for {S} .",
]  # fmt: skip


def held_out(items: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    """Two thirds for train and dev, one third for test only."""
    shuffled = items[:]
    rng.shuffle(shuffled)
    cut = len(shuffled) * 2 // 3
    return shuffled[:cut], shuffled[cut:]


def ner_sentence(rng: random.Random, diseases: list[str], chemicals: list[str]) -> list[tuple[str, str]]:
    out = []
    for word in rng.choice(NER_TEMPLATES).split():
        if word in ("{D}", "{C}"):
            name = rng.choice(diseases if word == "{D}" else chemicals)
            kind = "Disease" if word == "{D}" else "Chemical"
            out += [(w, f"{'B' if i == 0 else 'I'}-{kind}") for i, w in enumerate(name.split())]
        else:
            out.append((word, "O"))
    return out


def write_ner(root: Path, rng: random.Random) -> None:
    seen_d, new_d = held_out(DISEASES, rng)
    seen_c, new_c = held_out(CHEMICALS, rng)
    sizes = {
        "train": (240, seen_d, seen_c),
        "devel": (60, seen_d, seen_c),
        "test": (100, seen_d + new_d, seen_c + new_c),
    }
    root.mkdir(parents=True, exist_ok=True)
    for split, (n, diseases, chemicals) in sizes.items():
        blocks = ["\n".join(f"{w}\t{t}" for w, t in ner_sentence(rng, diseases, chemicals)) for _ in range(n)]
        (root / f"{split}.tsv").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")


def write_triage(root: Path, rng: random.Random) -> None:
    seen, new = {}, {}
    for system, phrases in SYSTEMS.items():
        seen[system], new[system] = held_out(phrases, rng)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 240), ("dev", 60), ("test", 100)):
        rows = []
        for i in range(n):
            system = list(SYSTEMS)[i % len(SYSTEMS)]
            pool = seen[system] + (new[system] if split == "test" else [])
            rows.append({"text": rng.choice(TRIAGE_TEMPLATES).replace("{S}", rng.choice(pool)), "label": system})
        rng.shuffle(rows)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent / "eval"
    rng = random.Random(20261202)
    write_ner(here / "ner", rng)
    write_triage(here / "triage", rng)
    print(f"wrote {here}")
