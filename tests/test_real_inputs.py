"""Inputs as users have them, shaped as their producers ship them: MEDLINE files of 2016 and earlier
(MedlineCitationSet), current PubMed files and efetch output, PMC Open Access JATS articles loose and in
bulk packages, MIMIC-IV-Note, files that are not what their names say, the DeepSpeed JSON files that
transformers documents, and a compute node without a hub. All text is invented."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, launch, minilm_dir, recipe_dict, summary, write_recipe
from transformers import AutoTokenizer

from biodistill.engine.config import ConfigError, DataConfig, load_recipe
from biodistill.engine.data import corpora
from biodistill.engine.data.cache import prepare
from biodistill.engine.plan import make_plan
from biodistill.engine.runtime.distributed import deepspeed_config

# --------------------------------------------------------------------------------- PubMed / MEDLINE

MEDLINE_2016 = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE MedlineCitationSet PUBLIC "-//NLM//DTD Medline Citation, 1st January, 2016//EN"
                                    "http://www.nlm.nih.gov/databases/dtd/nlmmedlinecitationset_160101.dtd">
<MedlineCitationSet>
<MedlineCitation Owner="NLM" Status="MEDLINE">
    <PMID Version="1">10000001</PMID>
    <DateCreated><Year>2015</Year><Month>03</Month><Day>02</Day></DateCreated>
    <Article PubModel="Print">
        <Journal><ISSN IssnType="Print">0000-0000</ISSN><Title>Journal of Invented Hepatology</Title></Journal>
        <ArticleTitle>Serum &#x3b1;-fetoprotein &amp; <i>HBV</i> DNA in cirrhosis.</ArticleTitle>
        <Abstract>
            <AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Hepatocellular carcinoma complicates cirrhosis.</AbstractText>
            <AbstractText Label="METHODS" NlmCategory="METHODS">We followed 212 patients for 10<sup>3</sup> days.</AbstractText>
            <AbstractText Label="RESULTS" NlmCategory="RESULTS">Levels above 20 ng/mL predicted tumours.</AbstractText>
        </Abstract>
        <AuthorList CompleteYN="Y"><Author ValidYN="Y"><LastName>Doe</LastName><ForeName>J</ForeName></Author></AuthorList>
        <Language>eng</Language>
        <PublicationTypeList><PublicationType UI="D016428">Journal Article</PublicationType></PublicationTypeList>
    </Article>
    <MedlineJournalInfo><Country>England</Country><MedlineTA>J Invent Hepatol</MedlineTA></MedlineJournalInfo>
    <OtherAbstract Type="Publisher" Language="fre"><AbstractText>Le carcinome complique la cirrhose.</AbstractText></OtherAbstract>
</MedlineCitation>
<MedlineCitation Owner="NLM" Status="PubMed-not-MEDLINE">
    <PMID Version="1">10000002</PMID>
    <Article PubModel="Electronic">
        <Journal><Title>Invented Renal Reports</Title></Journal>
        <ArticleTitle>Proteinuria and the progression of chronic kidney disease.</ArticleTitle>
        <Abstract><AbstractText>Albuminuria doubled the risk of dialysis.</AbstractText></Abstract>
    </Article>
</MedlineCitation>
<MedlineCitation Owner="NLM" Status="In-Data-Review">
    <PMID Version="1">10000003</PMID>
    <Article PubModel="Print"><ArticleTitle>A title with no abstract.</ArticleTitle></Article>
</MedlineCitation>
<DeleteCitation>
    <PMID Version="1">9999998</PMID>
    <PMID Version="1">9999999</PMID>
</DeleteCitation>
</MedlineCitationSet>
"""

PUBMED_CURRENT = """<?xml version="1.0" ?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">
<PubmedArticleSet>
<PubmedArticle>
    <MedlineCitation Status="MEDLINE" Owner="NLM" IndexingMethod="Automated">
        <PMID Version="1">38000001</PMID>
        <Article PubModel="Print-Electronic">
            <ArticleTitle>Sepsis bundles in the emergency department.</ArticleTitle>
            <Abstract>
                <AbstractText Label="OBJECTIVE" NlmCategory="OBJECTIVE">To measure adherence.</AbstractText>
                <AbstractText Label="CONCLUSIONS" NlmCategory="CONCLUSIONS">Adherence lowered mortality.</AbstractText>
                <CopyrightInformation>Copyright &#xa9; 2024.</CopyrightInformation>
            </Abstract>
        </Article>
    </MedlineCitation>
    <PubmedData><ArticleIdList><ArticleId IdType="pubmed">38000001</ArticleId></ArticleIdList></PubmedData>
</PubmedArticle>
<PubmedBookArticle><BookDocument><PMID Version="1">38000002</PMID></BookDocument></PubmedBookArticle>
</PubmedArticleSet>
"""


def test_medline_files_of_2016_and_earlier(tmp_path):
    path = tmp_path / "medline16n0001.xml.gz"
    path.write_bytes(gzip.compress(MEDLINE_2016.encode()))
    skipped = Counter()
    docs = list(corpora.read(path, corpora.ReadOptions(), skipped))
    assert docs == [
        (
            10000001,
            "Serum \u03b1-fetoprotein & HBV DNA in cirrhosis.\nBACKGROUND: Hepatocellular carcinoma complicates "
            "cirrhosis.\nMETHODS: We followed 212 patients for 103 days.\nRESULTS: Levels above 20 ng/mL predicted tumours.",
        ),
        (
            10000002,
            "Proteinuria and the progression of chronic kidney disease.\nAlbuminuria doubled the risk of dialysis.",
        ),
        (9999998, None),
        (9999999, None),
    ]  # the OtherAbstract (French) is not the abstract; the title-only citation is counted
    assert skipped == {"citation without abstract text": 1}


def test_current_pubmed_files_and_efetch_output(tmp_path):
    baseline = tmp_path / "pubmed25n0001.xml.gz"
    baseline.write_bytes(gzip.compress(PUBMED_CURRENT.encode()))
    efetch = tmp_path / "efetch.xml"  # efetch.fcgi?db=pubmed&retmode=xml answers with the same root
    efetch.write_text(PUBMED_CURRENT)
    for path in (baseline, efetch):
        skipped = Counter()
        docs = list(corpora.read(path, corpora.ReadOptions(), skipped))
        assert docs == [
            (38000001, "Sepsis bundles in the emergency department.\nOBJECTIVE: To measure adherence.\n"
                       "CONCLUSIONS: Adherence lowered mortality.")
        ]  # fmt: skip
        assert skipped == {"book record, not a journal citation": 1}


def test_a_known_format_that_yields_nothing_is_an_error_naming_the_root(tmp_path):
    # What efetch answers for a bad request, saved under the name the user expected.
    path = tmp_path / "batch.xml"
    path.write_text('<?xml version="1.0"?>\n<eFetchResult><ERROR>Empty id list</ERROR></eFetchResult>\n')
    with pytest.raises(corpora.BadInput) as error:
        list(corpora.read(path, corpora.ReadOptions(), Counter()))
    assert str(error.value) == (
        f"{path}: no PubMed citation (PubmedArticle, MedlineCitation or DeleteCitation) found in it "
        "(its root element is <eFetchResult>)"
    )
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(corpora.BadInput, match=r"blank\.txt: no line of text found in it \(only blank lines\)"):
        list(corpora.read(blank, corpora.ReadOptions(), Counter()))


def test_files_that_are_not_what_their_names_say_are_named_with_what_was_found(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    fake_gz = tmp_path / "notes.jsonl.gz"
    fake_gz.write_text('{"text": "plain text, never compressed"}\n')
    noise = tmp_path / "noise.jsonl"
    noise.write_bytes(bytes(range(256)) * 40 + b"\n{not json}\n")
    data = DataConfig(train_files=[str(fake_gz), str(noise)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as error:
        prepare(data, tokenizer, "r.yaml", True, lambda: None)
    message = str(error.value)
    assert message.startswith("r.yaml: data: found 0 usable document(s); need at least 2 (one held out). Per file: ")
    assert f"{fake_gz}: 0 document(s), skipped 1 not a gzip file, though named .gz" in message
    assert f"{noise}: 0 document(s), skipped " in message
    assert "invalid UTF-8 in a line" in message and "malformed JSON line" in message


# ---------------------------------------------------------------------------------- PMC (JATS)

JATS = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.3 20210610//EN" "JATS-archivearticle1-3.dtd">
<article xmlns:mml="http://www.w3.org/1998/Math/MathML" xmlns:xlink="http://www.w3.org/1999/xlink" article-type="research-article" dtd-version="1.3" xml:lang="en">
<front>
  <journal-meta><journal-id journal-id-type="nlm-ta">Invent Med</journal-id></journal-meta>
  <article-meta>
    <article-id pub-id-type="pmid">{pmid}</article-id>
    <article-id pub-id-type="pmc">{pmc}</article-id>
    <article-id pub-id-type="doi">10.0000/im.{pmc}</article-id>
    <title-group><article-title>Metformin and <italic>hepatic</italic> glucose output</article-title></title-group>
    <abstract>
      <sec><title>Background</title><p>Metformin lowers glucose production.</p></sec>
      <sec><title>Results</title><p>Output fell by 24%&nbsp;in 3 weeks.</p></sec>
    </abstract>
    <abstract abstract-type="graphical"><p>A graphical abstract.</p></abstract>
  </article-meta>
</front>
<body>
  <sec id="s1"><label>1.</label><title>Introduction</title>
    <p>Type 2 diabetes affects many adults [<xref ref-type="bibr" rid="r1">1</xref>, <xref ref-type="bibr" rid="r2">2</xref>].</p>
    <p>Hepatic output is measured by tracer (<xref ref-type="fig" rid="f1">Figure 1</xref>).</p>
  </sec>
  <sec id="s2"><title>Methods</title>
    <p>Clearance was <inline-formula><mml:math><mml:mi>k</mml:mi></mml:math></inline-formula> per hour&ndash;normalised.</p>
    <fig id="f1"><label>Figure 1</label><caption><p>Tracer kinetics, <bold>bold</bold> noise.</p></caption><graphic xlink:href="f1.jpg"/></fig>
    <table-wrap id="t1"><caption><p>Baseline table.</p></caption><table><tr><td>42</td></tr></table></table-wrap>
    <disp-formula id="e1"><mml:math><mml:mi>y</mml:mi></mml:math></disp-formula>
    <sec><title>Statistics</title><p>We used mixed models.</p>
      <list list-type="bullet"><list-item><p>Age was a covariate.</p></list-item></list>
    </sec>
  </sec>
  <supplementary-material id="s1m"><caption><p>Supplementary data.</p></caption></supplementary-material>
</body>
<back><ack><p>We thank the invented funders.</p></ack>
  <ref-list><ref id="r1"><mixed-citation>Smith J. A reference. 2001.</mixed-citation></ref></ref-list>
</back>
</article>
"""

JATS_TEXT = (
    "Metformin and hepatic glucose output\nBackground: Metformin lowers glucose production.\nResults: Output fell by "
    "24% in 3 weeks.\nIntroduction: Type 2 diabetes affects many adults.\nHepatic output is measured by tracer.\n"
    "Methods: Clearance was per hour\u2013normalised.\nStatistics: We used mixed models.\nAge was a covariate."
)


def article(pmc: int, pmid: int = 1) -> bytes:
    return JATS.replace("{pmc}", str(pmc)).replace("{pmid}", str(pmid)).encode()


def test_a_jats_article_loose(tmp_path):
    for name in ("PMC1234567.nxml", "article.xml"):  # .xml: the root element says PMC, not PubMed
        (tmp_path / name).write_bytes(article(1234567))
        assert corpora.detect_format(tmp_path / name) == "jats"
        skipped = Counter()
        assert list(corpora.read(tmp_path / name, corpora.ReadOptions(), skipped)) == [("PMC1234567", JATS_TEXT)]
        assert not skipped
    no_titles = corpora.ReadOptions(pmc_section_titles="drop", pmc_parts=("body",))
    (key, text), = corpora.read(tmp_path / "article.xml", no_titles, Counter())  # fmt: skip
    assert text.splitlines()[0] == "Type 2 diabetes affects many adults."


def pmc_package(path: Path, articles: dict[str, bytes], damaged_tail: bool = False) -> Path:
    """A bulk package as PMC ships them: a tar.gz of one folder per journal of .nxml files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = tarfile.TarInfo("Invent_Med")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in articles.items():
            info = tarfile.TarInfo(f"Invent_Med/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3] if damaged_tail else data)
    return path


def test_a_pmc_bulk_package_is_streamed(tmp_path):
    package = pmc_package(
        tmp_path / "oa_comm_xml.PMC000xxxxxx.baseline.2025-06-01.tar.gz",
        {
            "PMC0000001.nxml": article(1),
            "PMC0000002.nxml": article(2)[:-40],  # cut: malformed
            "PMC0000003.pdf": b"%PDF-1.4 not an article",
            "PMC0000004.nxml": b"<?xml version='1.0'?><pmc-articleset><article/></pmc-articleset>",
            "PMC0000005.nxml": article(5),
        },
    )
    assert corpora.detect_format(package) == "jats"
    skipped = Counter()
    docs = list(corpora.read(package, corpora.ReadOptions(), skipped))
    assert [k for k, _ in docs] == ["PMC1", "PMC5"] and docs[0][1] == JATS_TEXT
    assert skipped == {"malformed XML article": 1, "not a JATS article": 1}
    # A package cut short (an interrupted download) keeps what came before and says so.
    big = {f"PMC{i}.nxml": article(i) for i in range(1, 40)}
    cut = pmc_package(tmp_path / "oa_noncomm_xml.cut.tar.gz", big, damaged_tail=True)
    skipped = Counter()
    docs = list(corpora.read(cut, corpora.ReadOptions(), skipped))
    assert 0 < len(docs) < 39 and skipped == {"truncated or corrupt gzip": 1}


# --------------------------------------------------------------------------------- MIMIC-IV-Note

MIMIC_IV_HEADER = "note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text\n"


def mimic_iv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    lines = [MIMIC_IV_HEADER]
    for i, (note_id, kind, text) in enumerate(rows):
        quoted = '"' + text.replace('"', '""') + '"'
        lines.append(
            f"{note_id},1000000{i},2000000{i},{kind},{i + 1},2180-05-06 22:23:00,2180-05-06 23:32:00,{quoted}\n"
        )
    path.write_bytes(gzip.compress("".join(lines).encode()))
    return path


def test_mimic_iv_note(tmp_path):
    path = mimic_iv(
        tmp_path / "discharge.csv.gz",
        [
            (
                "10000032-DS-21",
                "DS",
                "Name:  ___ Unit No:   ___\n \nAdmission Date:  ___\nService: MEDICINE\nSigned: ________",
            ),
            ("10000032-AD-1", "AD", "Addendum: patient seen by ___ on ___."),
            ("10000084-RR-5", "RR", 'EXAMINATION:  CHEST (PA AND LAT)\nIMPRESSION: No "acute" process.'),
        ],
    )
    keep = list(corpora.read(path, corpora.ReadOptions(), Counter()))
    assert [k for k, _ in keep] == ["10000032-DS-21", "10000032-AD-1", "10000084-RR-5"]
    assert keep[0][1].startswith("Name:  ___ Unit No:   ___\n") and keep[2][1].endswith('No "acute" process.')
    normalised = list(corpora.read(path, corpora.ReadOptions(deid="normalise", note_types=("DS", "AD")), Counter()))
    assert (
        [t for _, t in normalised]
        == [
            "Name:  [PHI] Unit No:   [PHI]\n \nAdmission Date:  [PHI]\nService: MEDICINE\nSigned: ________",  # a form line stays
            "Addendum: patient seen by [PHI] on [PHI].",
        ]
    )
    removed = list(corpora.read(path, corpora.ReadOptions(deid="remove", note_types=("rr",)), Counter()))
    # A filter that keeps nothing of this file (radiology notes only, say) is a choice, not an empty file.
    assert list(corpora.read(path, corpora.ReadOptions(note_types=("AR",)), Counter())) == []
    assert removed == [("10000084-RR-5", 'EXAMINATION:  CHEST (PA AND LAT)\nIMPRESSION: No "acute" process.')]


def test_mimic_tables_that_hold_no_notes_are_refused_by_name(tmp_path):
    detail = tmp_path / "discharge_detail.csv.gz"
    detail.write_bytes(
        gzip.compress(b"note_id,subject_id,field_name,field_value,field_ordinal\n10000032-DS-21,1,author,___,1\n")
    )
    with pytest.raises(
        corpora.BadInput, match="a MIMIC-IV-Note detail table .* train on discharge.csv.gz or radiology.csv.gz"
    ):
        list(corpora.read(detail, corpora.ReadOptions(), Counter()))
    other = tmp_path / "admissions.csv"
    other.write_text("subject_id,hadm_id,admittime\n1,2,2180-05-06\n")
    with pytest.raises(
        corpora.BadInput, match="not a MIMIC-III NOTEEVENTS table .* its header has subject_id, hadm_id, admittime"
    ):
        list(corpora.read(other, corpora.ReadOptions(), Counter()))


# ------------------------------------------------------------------- DeepSpeed JSON from transformers

# transformers' documented ds_config_zero2.json and ds_config_zero3.json, as users copy them.
HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}, "allgather_partitions": True,
                          "allgather_bucket_size": 2e8, "overlap_comm": True, "reduce_scatter": True,
                          "reduce_bucket_size": "auto", "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}  # fmt: skip
HF_ZERO3 = {
    **{k: v for k, v in HF_ZERO2.items() if k != "zero_optimization"},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
}  # fmt: skip


def no_auto(node) -> bool:
    return all(no_auto(v) for v in node.values()) if isinstance(node, dict) else node != "auto"


def test_transformers_deepspeed_files_resolve_by_transformers_rules(tmp_path, tiny_teacher, tiny_corpus):
    for name, ds in (("ds_config_zero2.json", HF_ZERO2), ("ds_config_zero3.json", HF_ZERO3)):
        (tmp_path / name).write_text(json.dumps(ds, indent=4))
        recipe = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, [{"kind": "hidden_mse"}],
                             optim={"lr": 3e-4, "warmup_steps": 0}, train={"precision": "bf16", "max_steps": 50})  # fmt: skip
        r = load_recipe(write_recipe(tmp_path / "r.yaml", recipe), deepspeed_config=str(tmp_path / name))
        cfg = deepspeed_config(r, world=2, hidden_size=64)
        assert no_auto(cfg), name
        assert (cfg["fp16"]["enabled"], cfg["bf16"]["enabled"]) == (False, True)
        assert cfg["train_batch_size"] == 2 * 4 and cfg["gradient_clipping"] == r.train.grad_clip
        params = cfg["scheduler"]["params"]
        assert (params["warmup_min_lr"], params["warmup_max_lr"], params["warmup_num_steps"]) == (0, 3e-4, 1)
        assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
        if name.endswith("zero3.json"):
            assert params["total_num_steps"] == 50
            assert cfg["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
            assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    # A value nobody defines stays refused, by key.
    (tmp_path / "bad.json").write_text(
        json.dumps({**HF_ZERO2, "zero_optimization": {"stage": 2, "sub_group_size": "auto"}})
    )
    r = load_recipe(tmp_path / "r.yaml", deepspeed_config=str(tmp_path / "bad.json"))
    with pytest.raises(
        ConfigError, match=r"bad\.json: zero_optimization\.sub_group_size: 'auto' is only understood for"
    ):
        deepspeed_config(r, world=1, hidden_size=64)


# ------------------------------------------------------------------------------ start-up checks


def test_max_length_beyond_the_teacher_s_positions_is_refused_before_any_work(tmp_path, tiny_teacher, tiny_corpus):
    recipe = recipe_dict(tiny_teacher, tiny_corpus, tmp_path, [{"kind": "hidden_mse"}], data={"max_length": 1024})
    r = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    with pytest.raises(ConfigError) as error:
        make_plan(r, None)
    assert str(error.value) == (
        f"{tmp_path / 'r.yaml'}: data.max_length: 1024 tokens is longer than the teacher has positions for: 128 "
        f"(bert, {tiny_teacher}); set data.max_length 128 or less"
    )
    assert not any((tmp_path / "cache").iterdir())  # writable, and nothing was tokenised


# ----------------------------------------------------------------------------------- no hub


# Every host name a process looks up (an audit hook: socket.getaddrinfo is audited), written when it exits. The
# hub client's retries, the cost these tests guard against (221 s for the library path, issue 29), are lookups:
# counted, not timed, so a busy machine cannot fail them.
LOOKUPS = """
import atexit, os, sys
_hosts = []
sys.addaudithook(lambda event, args: _hosts.append(str(args[0])) if event == "socket.getaddrinfo" else None)
atexit.register(lambda: open(os.environ["LOOKUPS_OUT"], "w").write("\\n".join(_hosts)))
"""


def hosts_looked_up(tmp_path: Path, env: dict) -> Path:
    """Puts LOOKUPS in the child's sitecustomize; returns the file it writes the looked-up names to."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(LOOKUPS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")]))
    env["LOOKUPS_OUT"] = str(tmp_path / "lookups.txt")
    return tmp_path / "lookups.txt"


PLAN_ALL_RECIPES = """
import glob, sys, time
start = time.perf_counter()
from biodistill.engine.runtime import hub
if sys.argv[1] == "cli":
    hub.decide()  # what the command lines do at start
from biodistill.engine.config import load_recipe
from biodistill.engine.models.students import student_config, teacher_config
for path in sorted(glob.glob("configs/*.yaml")):
    r = load_recipe(path, check_paths=False)
    student_config(r, teacher_config(r))
print(hub._decision["online"], hub._decision["why"], round(time.perf_counter() - start, 1))
"""


@pytest.mark.skipif(subprocess.run(["unshare", "-n", "true"]).returncode != 0, reason="needs unshare -n (root)")
@pytest.mark.parametrize("caller", ["cli", "library"])
def test_offline_planning_of_every_recipe_takes_seconds(tmp_path, caller):
    """In a network namespace of its own (no route anywhere) and without HF_HUB_OFFLINE: the probe decides
    (at start for the command lines, at the first hub lookup for a notebook calling the loaders), and every
    recipe's full-size configs come from the published shapes at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    lookups = hosts_looked_up(tmp_path, env)
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", PLAN_ALL_RECIPES, caller], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    online, *why, seconds = proc.stdout.split()
    assert online == "False" and "huggingface.co:443 unreachable" in " ".join(why)
    # The probe's one lookup, then nothing: no recipe asked the hub (without the probe, every hub name of every
    # recipe was retried: 221 s for the library path, issue 29).
    assert lookups.read_text().split() == ["huggingface.co"]


def test_a_hub_name_missing_from_an_offline_cache_fails_at_once_naming_model_and_cache(tmp_path, tiny_corpus):
    recipe = recipe_dict(Path("dmis-lab/biobert-base-cased-v1.2"), tiny_corpus, tmp_path, [{"kind": "hidden_mse"}])
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    lookups = hosts_looked_up(tmp_path, env)
    proc = subprocess.run([sys.executable, "-m", "biodistill.engine", "--config", str(path)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert "huggingface.co" not in lookups.read_text().split()  # told offline: not one try
    assert (
        f"biodistill: error: {path}: teacher.path: model 'dmis-lab/biobert-base-cased-v1.2' is not in the local "
        f"Hugging Face cache ({tmp_path / 'hf' / 'hub'}) and the hub is not reachable from this node (HF_HUB_OFFLINE=1)"
    ) in proc.stderr


# ------------------------------------------------------------------------- real jobs on these inputs


def invented_corpora(root: Path) -> tuple[Path, Path]:
    """A PMC bulk package of articles and a MIMIC-IV discharge file, made from the bundled invented
    sample (abstracts become articles; notes keep their text with ___ for the removed spans)."""
    import re

    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    articles = {}
    for i, row in enumerate(r for r in rows if r["source"] == "pubmed_abstract"):
        title, _, rest = row["text"].partition(". ")
        sentences = [s for s in rest.split(". ") if s]
        body = "".join(f"<p>{s}.</p>" for s in sentences[len(sentences) // 2 :])
        abstract = "".join(f"<p>{s}.</p>" for s in sentences[: len(sentences) // 2])
        jats = (f'<?xml version="1.0"?><article><front><article-meta><article-id pub-id-type="pmc">{100 + i}</article-id>'
                f"<title-group><article-title>{title}</article-title></title-group><abstract>{abstract}</abstract>"
                f"</article-meta></front><body><sec><title>Results</title>{body}</sec></body></article>")  # fmt: skip
        articles[f"PMC{100 + i}.nxml"] = jats.replace("&", "&amp;").encode()
    package = pmc_package(root / "oa_comm_xml.PMC000xxxxxx.baseline.2025-06-01.tar.gz", articles)
    notes = [r for r in rows if r["source"] in ("discharge_summary", "imaging_report")]
    discharge = mimic_iv(
        root / "discharge.csv.gz",
        [(f"1{i:07d}-{'DS' if r['source'] == 'discharge_summary' else 'RR'}-{i}",
          "DS" if r["source"] == "discharge_summary" else "RR", re.sub(r"\[\*\*.*?\*\*\]", "___", r["text"]))
         for i, r in enumerate(notes)],
    )  # fmt: skip
    return package, discharge


@pytest.mark.multirank
def test_two_rank_job_on_a_pmc_package_and_mimic_iv_under_transformers_zero2_json(tmp_path, tiny_teacher):
    package, discharge = invented_corpora(tmp_path)
    (tmp_path / "ds_config_zero2.json").write_text(json.dumps(HF_ZERO2, indent=4))  # as documented: CPU offload
    recipe = recipe_dict(
        tiny_teacher, package, tmp_path, [{"kind": "hidden_mse"}, {"kind": "logit_kl"}],
        student={"init": "config", "overrides": {"num_hidden_layers": 2}},  # random: the loss has to fall
        data={"train_files": [str(package), str(discharge)], "deid": "normalise"},
        train={"max_steps": 10, "export": False, "eval_batches": 4},
    )  # fmt: skip
    recipe["student"].pop("teacher_layers", None)
    proc = launch(
        write_recipe(tmp_path / "r.yaml", recipe), "--deepspeed_config", str(tmp_path / "ds_config_zero2.json")
    )
    assert proc.returncode == 0
    s = summary(tmp_path / "run")
    assert s["data"]["files"] == 2 and s["data"]["documents_read"] == 177 + 118 + 38
    assert s["after"]["loss/total"] < s["before"]["loss/total"]
    resolved = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert no_auto(resolved) and resolved["zero_optimization"]["reduce_bucket_size"] == 64 * 64


@pytest.mark.multirank
def test_one_process_job_under_transformers_zero3_json_with_cpu_offload(tmp_path, tiny_teacher):
    """The documented ZeRO-3 file as it is (optimizer and parameters offloaded to CPU: DeepSpeedCPUAdam),
    in one process without the launcher, on the same inputs."""
    package, discharge = invented_corpora(tmp_path)
    (tmp_path / "ds_config_zero3.json").write_text(json.dumps(HF_ZERO3, indent=4))
    recipe = recipe_dict(
        tiny_teacher, package, tmp_path, [{"kind": "hidden_mse"}],
        student={"init": "config", "overrides": {"num_hidden_layers": 2}},
        data={"train_files": [str(package), str(discharge)]}, train={"max_steps": 6, "export": False},
    )  # fmt: skip
    recipe["student"].pop("teacher_layers", None)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cmd = [sys.executable, "-m", "biodistill.engine", "--config", str(path)]
    proc = subprocess.run([*cmd, "--deepspeed_config", str(tmp_path / "ds_config_zero3.json")], capture_output=True,
                          text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = summary(tmp_path / "run")
    assert s["job"]["zero_stage"] == 3 and s["job"]["world_size"] == 1
    assert s["after"]["loss/total"] < s["before"]["loss/total"]
    resolved = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert no_auto(resolved) and resolved["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert resolved["scheduler"]["params"]["total_num_steps"] == 6
