"""``src/eval.py``: every benchmark on tiny parquet copies, the shapes world end to end, resume, errors, and the
evaluation prompt token for token.

The model is the tiny one with random weights (``ckpt=null``): answers are nonsense, but every path (reading,
prompting, batched generation, writing, scoring, MLflow, the table) runs for real. The prompt tests use the
Llama-style tokenizer (whitespace-sensitive, BOS), with the expected strings written out per benchmark.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import open_clip
import pyarrow as pa
import pytest
import torch
from eval_fixtures import WRITERS, write_all, write_benchmark
from hydra import compose, initialize_config_dir
from llama_tokenizer import llama_style_tokenizer
from test_eval_benchmarks import IMAGE, STRING, png, write

from vargpt.config import register_configs
from vargpt.eval import core, runner
from vargpt.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkFileNotFoundError,
    benchmark_fingerprint,
    get_benchmark,
    read_benchmark,
)
from vargpt.model import build_vargpt, load_model_config

REPO = Path(__file__).resolve().parents[1]
CLIP_ARCH = "ViT-B-32"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST = ["max_new_tokens=4", "batch_size=4", "shapes.judge_validation=50", "shapes.t2i_max_new_tokens=2",
        "shapes.force_image=true"]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_all(tmp_path_factory.mktemp("benchmarks"))


def compose_eval(tmp_path: Path, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path}",
                                          *FAST, *overrides])  # fmt: skip


class CountPrompts:
    """Counts the prompts the evaluation core asks ``vargpt.inference.generate`` to answer (monkeypatched in)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        original = core.generate

        def counting(model, conversations, *args, **kwargs):
            self.n += len(conversations)
            return original(model, conversations, *args, **kwargs)

        monkeypatch.setattr(core, "generate", counting)


@pytest.fixture
def cached_model(monkeypatch):
    """runner.load_model building the random tiny model once per module (the CLI test loads for real)."""
    cache: dict[str, tuple] = {}
    load = runner.load_model

    def cached(cfg, out_dir):
        if "model" not in cache:
            cache["model"] = load(cfg, out_dir)
        return cache["model"]

    monkeypatch.setattr(runner, "load_model", cached)
    yield
    cache.clear()


def test_every_benchmark_and_shapes_with_mlflow(tmp_path, data_root, cached_model):
    """All ten benchmarks and the shapes world in one run: files, scores, the table and the MLflow run."""
    from mlflow.tracking import MlflowClient

    names = ["shapes", *BENCHMARKS]
    cfg = compose_eval(tmp_path, [f"benchmarks=[{','.join(names)}]", f"data_root={data_root}", "limit=2",
                                  "run_name=all"])  # fmt: skip
    results = runner.run(cfg)
    out_dir = Path(cfg.out_dir)
    table = (out_dir / "table.txt").read_text()
    for name in BENCHMARKS:
        lines = (out_dir / name / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 2, name
        assert {"id", "prompt", "answers", "prediction"} <= json.loads(lines[0]).keys()
        scores = json.loads((out_dir / name / "scores.json").read_text())
        assert scores == results[name] and scores["n"] == 2 and scores["errors"] == 0, name
        assert name in table, name
    shapes = results["shapes"]
    assert shapes["vqa/n"] == 2 and shapes["t2i/n"] == 2 and shapes["t2i/image_rate"] == 100.0
    assert 0 < shapes["vqvae/psnr"] < 100
    assert shapes["judge/validation_accuracy"] >= 98.0
    assert len(list((out_dir / "shapes" / "images").glob("*.png"))) == 2
    assert "vqa/accuracy" in table and "t2i/both" in table

    client = MlflowClient(f"sqlite:///{(tmp_path / 'logs').resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vargpt").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "all"
    assert "pope/pope_accuracy" in run.data.metrics and "mme/perception" in run.data.metrics
    assert "shapes/t2i/both" in run.data.metrics and "shapes/vqa/accuracy" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"pope", "shapes", "config"}


def test_script_shapes_end_to_end(tmp_path, cached_model, monkeypatch, capsys):
    """`python src/eval.py` with its defaults (the shapes world), run in this process through Hydra, prints both
    scores and writes the shapes files (the model is the module's cached random tiny one)."""
    log_dir = tmp_path / "logs"
    argv = ["eval.py", "limit=2", "logger=none", f"paths.log_dir={log_dir}", f"paths.data_dir={tmp_path}", *FAST]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "src" / "eval.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    assert "vqa/accuracy" in stdout and "t2i/both" in stdout
    (out_dir,) = (log_dir / "eval").iterdir()
    assert out_dir.name.startswith("eval-")
    assert {p.name for p in (out_dir / "shapes").iterdir()} >= {
        "vqa_predictions.jsonl", "t2i_predictions.jsonl", "scores.json", "images", "run.json",
        "position_confusion.json",
    }  # fmt: skip
    assert "t2i positions, asked (rows) vs judged" in stdout
    assert (out_dir / ".hydra" / "config.yaml").is_file()


def test_resume_from_a_partial_predictions_file(tmp_path, data_root, monkeypatch, cached_model):
    cfg = compose_eval(tmp_path, ["benchmarks=[pope]", f"data_root={data_root}", "logger=none", "run_name=pope"])
    counter = CountPrompts(monkeypatch)
    first = runner.run(cfg)["pope"]
    assert counter.n == 4 and first["n"] == 4
    path = Path(cfg.out_dir) / "pope" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    # An interrupted run: two predictions written, the third cut in the middle of its line.
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    counter.n = 0
    second = runner.run(cfg)["pope"]
    assert counter.n == 2  # only the missing questions were asked again
    resumed = path.read_text().splitlines()
    assert len(resumed) == 4 and resumed[:2] == lines[:2]
    assert [json.loads(x)["id"] for x in resumed] == [json.loads(x)["id"] for x in lines]
    assert second["pope_accuracy"] == first["pope_accuracy"]
    # A finished benchmark is not asked again; other generation settings refuse to mix into its file.
    counter.n = 0
    runner.run(cfg)
    assert counter.n == 0
    other = compose_eval(tmp_path, ["benchmarks=[pope]", f"data_root={data_root}", "logger=none",
                                    "max_new_tokens=3", "run_name=pope"])  # fmt: skip
    with pytest.raises(ValueError, match="other settings"):
        runner.run(other)


def test_shapes_with_clip_and_resume(tmp_path, monkeypatch, cached_model):
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(CLIP_ARCH, **TINY_CLIP).state_dict(), weights)
    model_cfg = str(TINY_CLIP).replace("'", "")
    cfg = compose_eval(tmp_path, ["limit=3", "logger=csv", f"clip.weights={weights}", f"clip.model_cfg={model_cfg}"])
    counter = CountPrompts(monkeypatch)
    scores = runner.run(cfg)["shapes"]
    assert counter.n == 6  # 3 questions + 3 instructions
    assert scores["vqa/n"] == 3 and scores["t2i/n"] == 3
    for key in ("vqa/accuracy", "t2i/colour", "t2i/shape", "t2i/both", "t2i/clip_matched", "t2i/clip_shuffled"):
        assert key in scores, key
    assert 0 <= scores["t2i/clip_matched"] <= 100
    table = (Path(cfg.out_dir) / "table.txt").read_text()
    assert "t2i/clip_matched" in table
    counter.n = 0
    again = runner.run(cfg)["shapes"]
    assert counter.n == 0  # everything was there already
    assert {k: v for k, v in again.items() if not k.endswith("_per_s")} == {
        k: v for k, v in scores.items() if not k.endswith("_per_s")
    }


def test_missing_files_and_unknown_names_are_clear(tmp_path):
    empty = tmp_path / "empty"
    write_benchmark("pope", empty)
    cfg = compose_eval(tmp_path, ["benchmarks=[pope,mme]", f"data_root={empty}", "logger=none"])
    with pytest.raises(BenchmarkFileNotFoundError, match=r"benchmark 'mme'.*lmms-lab/MME"):
        runner.run(cfg)
    assert not (Path(cfg.out_dir) / "pope").exists()  # checked before anything ran
    with pytest.raises(ValueError, match="unknown benchmark.*okvqa.*known: shapes, vqav2"):
        runner.run(compose_eval(tmp_path, ["benchmarks=[okvqa]"]))


def test_fixtures_cover_every_benchmark():
    assert set(WRITERS) == set(BENCHMARKS)


def test_checkpoint_folders_and_files_load(tmp_path, data_root):
    """An exported folder (and the training run folder holding it as export/) and a state-dict file with the
    world's tokenizer are what ``ckpt=`` takes; each gives the model that was saved."""
    from safetensors.torch import save_file

    from vargpt.training.checkpointing import export_model

    cfg = compose_eval(tmp_path, ["benchmarks=[pope]", f"data_root={data_root}", "logger=none", "limit=1"])
    model, _ = runner.load_model(cfg, tmp_path)  # the random tiny model with a throwaway tokenizer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(state, model, model.tokenizer, tmp_path / "run" / "export", "fp32")
    model.tokenizer.save_pretrained(str(tmp_path / "shapes" / "tokenizer"))  # as if the world were built
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    for ckpt, kind in ((tmp_path / "run" / "export", "folder"), (tmp_path / "run", "folder"),
                       (tmp_path / "weights.safetensors", "weights from")):  # fmt: skip
        loaded, what = runner.load_model(compose_eval(tmp_path, [f"ckpt={ckpt}"]), tmp_path)
        assert what.startswith(kind) or kind in what, what
        assert torch.equal(loaded.state_dict()["language_model.lm_head.weight"], state["language_model.lm_head.weight"])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        runner.load_model(compose_eval(tmp_path, [f"ckpt={tmp_path / 'nothing.ckpt'}"]), tmp_path)


def test_table_counts_each_shapes_part_on_its_own():
    scores = {
        "vqa/n": 200.0,
        "vqa/accuracy": 58.5,
        "t2i/n": 100.0,
        "t2i/both": 2.0,
        "vqvae/psnr": 25.5,
        "vqvae/n": 50.0,
    }
    rows = {line.split()[1]: line.split()[-1] for line in runner.format_table({"shapes": scores}).splitlines()[2:]}
    assert rows == {"vqa/accuracy": "200", "t2i/both": "100", "vqvae/psnr": "50"}
    assert runner.format_table({"mmbench": {"accuracy": 70.0, "n": 10.0}}).splitlines()[2].split()[-1] == "10"


# --------------------------------------------------------------------------------------------- the prompt
# The release's system prompt and the tiny model's image block (64 tokens), written out so that drift shows.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
IMG = "<image>" * 64
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
# Per benchmark: the item of eval_fixtures asked, and lmms-eval's whole prompt string for it (VARGPT wrapper:
# Vicuna template, "<image>"s space-joined and a newline put first, image tokens expanded).
EXPECTED_PROMPTS = {
    "vqav2": (0, f"{SYSTEM} USER: {IMG}\nHow many cats?{SHORT} ASSISTANT:"),
    "gqa": (0, f"{SYSTEM} USER: {IMG}\nIs the sky blue?{SHORT} ASSISTANT:"),
    "textvqa": (0, f"{SYSTEM} USER: {IMG}\nWhat does the sign say?{SHORT} ASSISTANT:"),
    "vizwiz": (0, f"{SYSTEM} USER: {IMG}\nWhat is this?\nWhen the provided information is insufficient, respond "
                  f"with 'Unanswerable'.{SHORT} ASSISTANT:"),
    "scienceqa_img": (0, f"{SYSTEM} USER: {IMG}\nContext: Look at the picture.\nWhich animal is a mammal?\nA. frog"
                         f"\nB. dog\nC. fish{LETTER} ASSISTANT:"),
    "pope": (0, f"{SYSTEM} USER: {IMG}\nIs there a dog in the image?{SHORT} ASSISTANT:"),
    "mme": (0, f"{SYSTEM} USER: {IMG}\nIs this a painting?{SHORT} ASSISTANT:"),
    "mmbench": (1, f"{SYSTEM} USER: {IMG}\nIt barks. What animal is shown? There are several options:\nA. cat\n"
                   f"B. dog\n{LETTER} ASSISTANT:"),
    "seedbench": (1, f"{SYSTEM} USER: {IMG} {IMG}\nWhat is the person doing?\nA. run\nB. walk\nC. sit\nD. jump"
                     f"{LETTER} ASSISTANT:"),
    "mmmu": (0, f"{SYSTEM} USER: {IMG}\nWhich style is <image 1>?\nA. Baroque\nB. Cubism\n\nAnswer with the "
                "option's letter from the given choices directly. ASSISTANT:"),
}  # fmt: skip


@pytest.fixture(scope="module")
def llama_model():
    torch.manual_seed(0)
    model = build_vargpt(load_model_config(REPO / "conf" / "model" / "tiny.yaml"), llama_style_tokenizer())
    assert model.num_image_tokens == 64
    return model.eval()


def test_expected_prompts_cover_every_benchmark():
    assert set(EXPECTED_PROMPTS) == set(BENCHMARKS)


@pytest.mark.parametrize("benchmark", sorted(EXPECTED_PROMPTS))
def test_runner_asks_lmms_eval_prompts_token_for_token(benchmark, data_root, llama_model):
    """The ids fed to the model are the tokenizer's encoding, with BOS, of lmms-eval's whole prompt string."""
    index, expected = EXPECTED_PROMPTS[benchmark]
    item = list(read_benchmark(benchmark, data_root))[index]
    sampling = get_benchmark(benchmark).sampling(max_new_tokens=1)
    (out,) = core.answer_items(llama_model, [item], sampling)
    ids = llama_style_tokenizer()(expected)["input_ids"]
    assert ids[0] == llama_model.ids.bos
    assert out.prompt_ids == ids


@pytest.mark.parametrize("benchmark", ["textvqa", "vizwiz", "mmbench", "seedbench"])
def test_benchmark_sampling_drops_the_tasks_until(benchmark):
    """The four tasks whose YAML stops at "ASSISTANT:": the wrapper drops `until`, and so do we (even over a base
    sampling that had stop strings); greedy, the task's length, no image."""
    sampling = get_benchmark(benchmark).sampling(base={"stop": ["ASSISTANT:"]})
    assert sampling.stop == [] and sampling.greedy and sampling.max_images == 0
    assert sampling.max_new_tokens == BENCHMARKS[benchmark].max_new_tokens == 1024


def test_answer_is_the_text_after_the_last_marker(llama_model):
    marker = core.answer_marker(llama_model.tokenizer)  # no chat template: Vicuna's
    assert marker == "ASSISTANT:"
    assert core.extract_answer(" B\n", marker) == "B"
    assert core.extract_answer("A USER: why? ASSISTANT: C. sit ", marker) == "C. sit"
    llama_model.tokenizer.chat_template = "[INST] {{ messages[0]['content'] }} [/INST]"
    try:
        assert core.answer_marker(llama_model.tokenizer) == "[/INST]"
    finally:
        llama_model.tokenizer.chat_template = None


def test_prompts_past_the_position_limit_are_run_and_counted(tmp_path, cached_model):
    """A SEED video row with 9 frames x 64 tokens exceeds the tiny LLM's 512 positions: it is answered (as
    lmms-eval runs it), not refused, and counted in scores.json and the table."""
    choices = {f"choice_{k}": (STRING, [k.upper(), k.upper()]) for k in "abcd"}
    write(tmp_path / "data", "SEED-Bench/data/test-00000-of-00001.parquet", {
        "answer": (STRING, ["A", "B"]), **choices, "data_type": (STRING, ["image", "video"]),
        "question": (STRING, ["Which?", "What happens?"]), "question_id": (STRING, ["1", "2"]),
        "image": (pa.list_(IMAGE), [[png("red")], [png("blue")] * 9]),
    })  # fmt: skip
    cfg = compose_eval(tmp_path, ["benchmarks=[seedbench]", f"data_root={tmp_path / 'data'}", "logger=none"])
    scores = runner.run(cfg)["seedbench"]
    assert scores["n"] == 2 and scores["errors"] == 0 and scores["over_position_limit"] == 1
    short, long = (json.loads(line) for line in (Path(cfg.out_dir) / "seedbench" / "predictions.jsonl").open())
    assert long["prompt_tokens"] > 512 and long["over_position_limit"] and "error" not in long
    assert not short["over_position_limit"]
    table = (Path(cfg.out_dir) / "table.txt").read_text()
    assert [line.split() for line in table.splitlines() if "over_position_limit" in line] == [
        ["seedbench", "over_position_limit", "1", "2"]
    ]


# --------------------------------------------------------------------------------------------- stale outputs
def test_stale_predictions_are_refused_naming_what_differs(tmp_path, data_root, cached_model):
    """An out_dir holding predictions is resumed only with everything that defines them unchanged: another data
    root, a rewritten benchmark file or another limit is refused, naming the difference and the way out."""
    copy = tmp_path / "copy"
    shutil.copytree(data_root, copy)
    common = ["benchmarks=[pope]", "logger=none", "run_name=fixed"]
    first = compose_eval(tmp_path, [*common, f"data_root={copy}", "limit=2"])
    runner.run(first)
    run_file = json.loads((Path(first.out_dir) / "pope" / "run.json").read_text())
    assert run_file["data_root"] == str(copy.resolve()) and run_file["limit"] == 2
    assert run_file["files"] == benchmark_fingerprint("pope", copy)
    assert run_file["prompt"]["format"] == "evaluation" and run_file["sampling"]["stop"] == []

    cases = {
        "another data root": ([f"data_root={data_root}", "limit=2"], r"data_root: \".*\" -> \""),
        "another limit": ([f"data_root={copy}", "limit=3"], "limit: 2 -> 3"),
    }
    for what, (overrides, difference) in cases.items():
        with pytest.raises(ValueError, match=difference) as error:
            runner.run(compose_eval(tmp_path, [*common, *overrides]))
        assert f"delete {Path(first.out_dir) / 'pope'}" in str(error.value), what
    pope = copy / "POPE/data/test-00000-of-00001.parquet"
    os.utime(pope, ns=(pope.stat().st_atime_ns, pope.stat().st_mtime_ns + 10**9))  # the file was rewritten
    with pytest.raises(ValueError, match="files: added, removed or rewritten since: POPE/data/test-00000"):
        runner.run(first)


def test_the_default_folder_is_keyed_on_what_defines_the_predictions(tmp_path, data_root):
    base = ["benchmarks=[pope]", f"data_root={data_root}"]
    folders = {compose_eval(tmp_path, [*base, *extra]).out_dir for extra in (
        [], ["limit=3"], [f"data_root={tmp_path}"], ["sampling.greedy=false"], ["dtype=bfloat16"],
        ["tokenizer=/tok"], ["ckpt=/model"], ["model=vargpt_llava_7b"],
    )}  # fmt: skip
    assert len(folders) == 8
    assert compose_eval(tmp_path, [*base, "faithful=false", "batch_size=2"]).out_dir in folders  # scoring, speed


# --------------------------------------------------------------------------------------------- ckpt folders
def test_a_run_folder_without_export_names_the_next_step(tmp_path):
    run_dir = tmp_path / "runs" / "pretrain-tiny-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        runner.run(compose_eval(tmp_path, [f"ckpt={run_dir}", "logger=none"]))
    message = str(error.value)
    assert f"ckpt={run_dir} is a training run folder without an export/ folder" in message
    assert "Rerun the training command" in message and str(run_dir / "checkpoints" / "last.ckpt") in message
    with pytest.raises(FileNotFoundError, match="neither an exported or released model folder"):
        runner.run(compose_eval(tmp_path, [f"ckpt={tmp_path / 'runs'}", "logger=none"]))
