"""The GPU paths, run for real: skipped without CUDA; the DDP runs need two GPUs.

    python -m pytest -q tests/test_gpu.py

Each run is a short one of a tiny model on synthetic text (20 optimizer steps), through
the scripts as a user starts them: NCCL under torchrun, bf16 autocast where the GPU has
it natively (fp16 otherwise), a resume from a state file, --compile, GLUE, and bench.py.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, toy_lines, write_rte, write_wikitext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP needs 2 GPUs")

TINY = ["--emsize", "64", "--nhid", "128", "--nlayers", "2", "--nhead", "2", "--bptt", "32",
        "--batch_size", "8", "--log-interval", "5", "--device", "cuda"]


def dtype():
    native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
        including_emulation=False)
    return ["--dtype", "bf16" if native_bf16 else "fp16"]


def run(*command, cwd, timeout=600):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def script(name, *flags, nproc=1):
    if nproc == 1:
        return [sys.executable, str(REPO / name), *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(REPO / name), *flags, "--parallel", "DDP"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a WikiText-2-layout corpus and a tiny SQuAD file."""
    import json

    folder = tmp_path_factory.mktemp("gpu")
    write_wikitext(folder / "data", toy_lines(600, 0, 60), toy_lines(40, 1, 60),
                   toy_lines(40, 2, 60))
    paragraphs = []
    for i, line in enumerate(toy_lines(30, 3, 40)):
        answer = " ".join(line.split()[5:7])
        paragraphs.append({"context": line, "qas": [{
            "id": str(i), "question": f"what follows {line.split()[4]}",
            "answers": [{"text": answer, "answer_start": line.index(answer)}]}]})
    (folder / "squad.json").write_text(json.dumps({"data": [{"title": "t",
                                                            "paragraphs": paragraphs}]}))
    return folder


DATA = ["--data-dir", "data", "--dataset", "WikiText2"]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=needs_two)])
def test_mlm_ns_qa_train_on_gpus(work, nproc):
    steps = ["--epochs", "1", "--max-steps", "20"]
    out = run(*script("mlm_task.py", *DATA, *TINY, *dtype(), *steps, nproc=nproc), cwd=work)
    assert out.count("End of training") == 1
    out = run(*script("ns_task.py", "--bert-model", "mlm_bert.pt", *DATA, *TINY, *dtype(),
                      *steps, "--min_sentence_len", "20", nproc=nproc), cwd=work)
    assert out.count("End of training") == 1
    out = run(*script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "squad.json",
                      "--dev-file", "squad.json", *TINY, *dtype(), *steps, "--max-query-len",
                      "8", nproc=nproc), cwd=work)
    assert out.count("End of training") == 1


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=needs_two)])
def test_resume_from_a_state_file_on_gpus(work, nproc, tmp_path):
    flags = [*DATA, *TINY, *dtype(), "--epochs", "2", "--max-steps", "20", "--save-every", "10",
             "--state-file", str(tmp_path / "state.pt"), "--save", str(tmp_path / "enc.pt")]
    run(*script("mlm_task.py", *flags, nproc=nproc), cwd=work)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert len(state["rng"]) == nproc and "cuda" in state["rng"][0]
    out = run(*script("mlm_task.py", "--checkpoint", str(tmp_path / "state.pt"),
                      "--max-steps", "30", nproc=nproc), cwd=work)
    assert "resumed from" in out and out.count("End of training") == 1


def test_fp16_resume_of_an_fp32_state(work, tmp_path):
    """A state saved without a gradient scaler resumes under fp16 with a fresh one."""
    flags = [*DATA, *TINY, "--dtype", "fp32", "--epochs", "1", "--max-steps", "10",
             "--state-file", str(tmp_path / "state.pt"), "--save", str(tmp_path / "enc.pt")]
    run(*script("mlm_task.py", *flags), cwd=work)
    out = run(*script("mlm_task.py", "--checkpoint", str(tmp_path / "state.pt"), "--dtype",
                      "fp16", "--epochs", "2", "--max-steps", "15"), cwd=work)
    assert "End of training" in out


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=needs_two)])
def test_qa_compiles(work, nproc):
    run(*script("mlm_task.py", *DATA, *TINY, "--epochs", "1", "--max-steps", "5"), cwd=work)
    out = run(*script("qa_task.py", "--bert-model", "mlm_bert.pt", "--train-file", "squad.json",
                      "--dev-file", "squad.json", *TINY, *dtype(), "--epochs", "1",
                      "--max-steps", "20", "--max-query-len", "8", "--compile", nproc=nproc),
              cwd=work, timeout=900)
    assert out.count("End of training") == 1


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=needs_two)])
def test_glue_trains_eager_and_compiled_on_gpus(work, nproc):
    """glue_task.py on CUDA: batches padded to their longest pair (eager) or to --bptt (one
    shape under --compile), the <cls>-only last layer, the dev scores, the predictions."""
    write_rte(work / "data" / "glue" / "RTE", 64, 16)
    run(*script("mlm_task.py", *DATA, *TINY, "--epochs", "1", "--max-steps", "5", "--save",
                "glue_enc.pt", "--state-file", "glue_enc_state.pt"), cwd=work)
    for compile_flag in ("--no-compile", "--compile"):
        out = run(*script("glue_task.py", "--bert-model", "glue_enc.pt", "--task", "RTE",
                          "--data-dir", "data", "--device", "cuda", "--bptt", "32",
                          "--batch_size", "8", "--epochs", "2", *dtype(), compile_flag,
                          "--output-dir", f"glue{nproc}{compile_flag}", nproc=nproc),
                  cwd=work, timeout=900)
        assert out.count("End of training") == 1 and "scored 16 examples" in out
        assert (work / f"glue{nproc}{compile_flag}" / "glue_predictions.tsv").is_file()


def test_bench_on_cuda(work):
    out = run(sys.executable, str(REPO / "bench.py"), "--device", "cuda", "--quick",
              cwd=REPO, timeout=900)
    last = out.strip().splitlines()[-1].split()
    assert last[0::2] == ["mlm_train_ratio", "qa_infer_ratio", "mfu"]
    assert all(float(value) > 0 for value in last[1::2])


def test_glue_bench_on_cuda(work):
    out = run(sys.executable, str(REPO / "bench.py"), "--glue", "--device", "cuda", "--quick",
              cwd=REPO, timeout=900)
    last = out.strip().splitlines()[-1].split()
    assert last[0::2] == ["glue_train_padded", "glue_train_dynamic", "glue_eval_padded",
                          "glue_eval_dynamic"]
    assert all(float(value) > 0 for value in last[1::2])


def test_loop_ratio_on_cuda(work):
    """The trainer's loop against its bare step on the GPU (bench.py --loop): the ratio is
    printed for the note (no timing assertion); the loop must run under compile too."""
    for flags in ([], ["--compile"]):
        out = run(sys.executable, str(REPO / "bench.py"), "--loop", "--device", "cuda",
                  "--quick", "--config", "base", "--batch_size", "64", *flags, cwd=REPO,
                  timeout=900)
        last = out.strip().splitlines()[-1].split()
        assert last[0::2] == ["loop_ratio", "batch_ms"]
        assert all(float(value) > 0 for value in last[1::2])
        print(" ".join(flags) or "eager", out.strip().splitlines()[-4:])
