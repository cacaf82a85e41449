"""`pagedbatch run --ray` and pagedbatch.ray on a real local Ray cluster, tiny real models.

One cluster (8 logical CPUs: the replicas, Ray Data's tasks and Ray's own) serves the
module; jobs started as real processes join it with --ray-address. Each replica is a
fresh process that imports torch and loads the model (several seconds on 2 CPUs), so the
jobs here are few and share one input and one single-process run to compare with.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from job_helpers import by_id, invoke, read_lines, start, wait_for_lines, write_jsonl
from tiny_models import CORPUS

from pagedbatch.ray.shards import cut_points, make_shards
from pagedbatch.requests.prompt_store import PromptStore

NUM_RECORDS = 96
INSTRUCTION = " ".join((CORPUS[2], CORPUS[3], CORPUS[5]))  # ~170 tokens, every record's


def label_rows() -> list[dict]:
    """The label workload in miniature: one long shared instruction, a short review each;
    odd records sampled (the job seed gives each its own), one record that cannot run."""
    rows = []
    for i in range(NUM_RECORDS):
        review = f"Review {i}: " + CORPUS[i % len(CORPUS)][: 20 + (i * 7) % 40]
        row = {"id": f"r{i:03d}", "prompt": f"{INSTRUCTION}\n{review}\nLabel:"}
        if i % 2:
            row["temperature"] = 0.9
        rows.append(row)
    rows.append({"id": "bad", "prompt": "x", "max_tokens": -5})
    return rows


@pytest.fixture(scope="module")
def ray_cluster():
    """The address of a local Ray cluster this test process is connected to."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=8, include_dashboard=False, namespace="pagedbatch", log_to_driver=False,
        logging_level=logging.ERROR,
    )  # fmt: skip
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dirs):
    """(directory, flags, id -> line of the single-process run, its memory report)."""
    root = tmp_path_factory.mktemp("ray_job")
    write_jsonl(root / "in.jsonl", label_rows())
    flags = [
        "-m", tiny_model_dirs["llama"], "--device", "cpu", "--dtype", "float32",
        "--num-blocks", "512", "--max-tokens", "32", "--max-num-seqs", "4", "--threads", "1",
        "--seed", "7", "--no-progress",
    ]  # fmt: skip
    out = root / "single.jsonl"
    result = invoke(root / "in.jsonl", "-o", out, *flags, "--memory-report")
    assert result.exit_code == 0, result.output
    report = json.loads((root / "single.memory.json").read_text())
    return root, [str(f) for f in flags], by_id(read_lines(out)), report


def texts(lines: dict) -> dict:
    """id -> what decides the text of a line (its choices, or its error); cached_tokens
    differ by where a record ran, so usage is left out."""
    return {rid: (line.get("choices"), line.get("error")) for rid, line in lines.items()}


def test_two_replicas_write_the_single_process_text_and_share_prefixes(ray_cluster, job):
    root, flags, single, single_report = job
    out = root / "ray.jsonl"
    result = invoke(root / "in.jsonl", "-o", out, *flags, "--ray", "--replicas", "2",
                    "--memory-report")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "On Ray: 2 replicas" in result.output
    lines = by_id(read_lines(out))  # every id once
    assert texts(lines) == texts(single)
    assert lines["bad"]["error"]["code"] == "invalid_params"
    report = json.loads((root / "ray.memory.json").read_text())
    assert len(report["replicas"]) == 2
    assert single_report["prefix_hit_rate"] > 0.7
    assert abs(report["prefix_hit_rate"] - single_report["prefix_hit_rate"]) <= 0.02


def ray_args(root, out, flags, cluster) -> list[str]:
    """`run` flags of the job on the test cluster with 2 replicas, writing `out`."""
    return [str(root / "in.jsonl"), "-o", str(out), *flags, "--ray", "--replicas", "2",
            "--ray-address", cluster]  # fmt: skip


def test_a_killed_replica_s_shard_runs_again_without_duplicates(ray_cluster, job):
    import ray

    root, flags, single, _ = job
    out = root / "killed_replica.jsonl"
    process = start(ray_args(root, out, flags, ray_cluster), root)
    try:
        wait_for_lines(out, 3, process, timeout=120)
        prefix = f"pagedbatch-replica-{process.pid}-"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        ray.kill(ray.get_actor(min(n for n in names if n.startswith(prefix)), "pagedbatch"))
        stdout, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "was replaced" in stdout + stderr, stdout + stderr
    assert texts(by_id(read_lines(out))) == texts(single)


def test_a_killed_driver_resumes_on_ray_with_the_same_text(ray_cluster, job):
    root, flags, single, _ = job
    out = root / "killed_driver.jsonl"
    args = ray_args(root, out, flags, ray_cluster)
    process = start(args, root)
    try:
        written = wait_for_lines(out, 5, process, timeout=120)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert written < len(single)
    result = invoke(root / "in.jsonl", "-o", out, *flags, "--ray", "--replicas", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output
    assert texts(by_id(read_lines(out))) == texts(single)


def test_choices_on_ray_score_as_one_process(ray_cluster, job):
    root, flags, _, _ = job
    rows = [{"id": f"c{i}", "prompt": f"{INSTRUCTION}\nReview {i}: {CORPUS[i % len(CORPUS)][:30]}"}
            for i in range(12)]  # fmt: skip
    rows += [{"id": "own", "prompt": "Is it good?", "choices": ["yes", "no", "maybe not"]},
             {"id": "bad", "prompt": "x", "choices": []}]  # fmt: skip
    write_jsonl(root / "choices.jsonl", rows)
    outs = {}
    for name, extra in (("single", []), ("ray", ["--ray", "--replicas", "2"])):
        outs[name] = root / f"choices-{name}.jsonl"
        result = invoke(root / "choices.jsonl", "-o", outs[name], *flags,
                        "--choices", "positive,negative", *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
    single, ray = by_id(read_lines(outs["single"])), by_id(read_lines(outs["ray"]))
    assert ray.keys() == single.keys() == {r["id"] for r in rows}
    assert ray["bad"]["error"] == single["bad"]["error"]
    assert single["bad"]["error"]["code"] == "invalid_params"
    assert [c["text"] for c in single["own"]["choices"]] == ["yes", "no", "maybe not"]
    for rid, line in single.items():
        if "error" not in line:
            assert ray[rid]["label"] == line["label"]
            assert [c["text"] for c in ray[rid]["choices"]] == [c["text"] for c in line["choices"]]
            assert [c["logprob"] for c in ray[rid]["choices"]] == pytest.approx(
                [c["logprob"] for c in line["choices"]], abs=1e-4
            )


def test_constrained_outputs_on_ray_are_one_process_s(ray_cluster, job):
    pytest.importorskip("xgrammar")
    root, flags, _, _ = job
    schema = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]},
              "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["label", "stars"]}  # fmt: skip
    rows = [{"id": f"s{i}", "prompt": f"{INSTRUCTION}\nReview {i}: {CORPUS[i % len(CORPUS)][:30]}",
             **({"temperature": 0.9} if i % 2 else {})} for i in range(12)]  # fmt: skip
    rows += [{"id": "own", "prompt": "Is it good?", "regex": "(yes|no)!"},
             {"id": "bad", "prompt": "x", "regex": "[0-9"}]  # fmt: skip
    write_jsonl(root / "constrained.jsonl", rows)
    outs = {}
    for name, extra in (("single", []), ("ray", ["--ray", "--replicas", "2"])):
        outs[name] = root / f"constrained-{name}.jsonl"
        result = invoke(root / "constrained.jsonl", "-o", outs[name], *flags,
                        "--json-schema", json.dumps(schema), *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
    single, ray = by_id(read_lines(outs["single"])), by_id(read_lines(outs["ray"]))
    assert texts(ray) == texts(single)
    assert single["bad"]["error"]["code"] == "invalid_params"
    assert single["own"]["choices"][0]["text"] in ("yes!", "no!")
    assert sum("json" in line["choices"][0] for line in single.values() if "choices" in line) >= 6


def test_ray_data_processor_adds_ray_data_llm_columns(ray_cluster, tiny_model_dirs):
    import ray

    from pagedbatch.llm import LLM
    from pagedbatch.ray import PagedBatchProcessor

    rows = [{"id": f"q{i}", "prompt": f"story number {i} " * 3, "max_tokens": 6} for i in range(7)]
    rows[3]["max_tokens"] = -5
    engine = {"model": str(tiny_model_dirs["llama"]), "device": "cpu", "num_blocks": 64,
              "threads": 1}  # fmt: skip
    done = ray.data.from_items(rows).map_batches(
        PagedBatchProcessor, fn_constructor_kwargs={**engine, "should_continue_on_error": True},
        concurrency=1, batch_size=4,
    ).take_all()  # fmt: skip
    expected = {o.id: o for o in LLM(**engine).generate(rows)}
    assert sorted(r["id"] for r in done) == sorted(expected)
    for row in done:
        want = expected[row["id"]]
        assert row["generated_text"] == want.text
        assert row["num_input_tokens"] == want.prompt_tokens
        assert row["num_generated_tokens"] == want.completion_tokens
        assert row["prompt"] == rows[int(row["id"][1:])]["prompt"]  # input columns kept
        error = row["__inference_error__"]
        assert (error.startswith("invalid_params: max_tokens") if row["id"] == "q3"
                else error == "")  # fmt: skip


def test_build_processor_maps_a_dataset_as_the_readme_shows(ray_cluster, tiny_model_dirs):
    import ray

    from pagedbatch.llm import LLM
    from pagedbatch.ray import build_processor
    from pagedbatch.sampling_params import SamplingParams

    rows = [{"id": f"b{i}", "prompt": f"tale number {i} " * 2} for i in range(5)]
    rows[1]["max_tokens"] = 2  # a row's column wins over the sampling defaults
    rows[4]["temperature"] = -1.0
    model, engine = str(tiny_model_dirs["llama"]), {"device": "cpu", "num_blocks": 64, "threads": 1}
    process = build_processor(
        model, concurrency=1, batch_size=3, sampling={"max_tokens": 5, "ignore_eos": True},
        should_continue_on_error=True, **engine,
    )  # fmt: skip
    done = {row["id"]: row for row in process(ray.data.from_items(rows)).take_all()}
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    expected = {o.id: o for o in LLM(model, **engine).generate(rows, params)}
    assert sorted(done) == sorted(expected)
    assert [done[f"b{i}"]["num_generated_tokens"] for i in range(4)] == [5, 2, 5, 5]
    for rid, row in done.items():
        assert row["generated_text"] == expected[rid].text
        assert row["num_input_tokens"] == expected[rid].prompt_tokens
    assert done["b4"]["__inference_error__"].startswith("invalid_params: temperature")
    assert done["b4"]["num_input_tokens"] == 0 < done["b0"]["num_input_tokens"]
    assert all(done[f"b{i}"]["__inference_error__"] == "" for i in range(4))


def test_ray_flag_without_ray_says_how_to_install_it_in_one_line(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    code = (
        "import sys; sys.modules['ray'] = None; "
        "sys.argv = ['pagedbatch', 'run', 'in.jsonl', '--ray']; "
        "from pagedbatch.cli.main import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        'error: Ray is not installed; --ray needs it: pip install -e ".[ray]"'
    )
    assert not (tmp_path / "in.output.jsonl").exists()


def test_shards_are_cut_where_neighbouring_prompts_share_least():
    groups = [[1, 2, 3, 4, i] for i in range(6)] + [[1, 9, 9, i] for i in range(6)]
    keys = [*groups[6:], *groups[:6]]  # out of order: make_shards sorts them
    store = PromptStore(16)
    for key in keys:
        store.append(key)
    shards = make_shards(store, 2)
    assert [s.numbers.tolist() for s in shards] == [list(range(6, 12)), list(range(6))]
    # lcps in depth-first order: 4 within the first group, 1 at the boundary, 3 after it.
    assert cut_points(np.array([0, 4, 4, 4, 4, 4, 1, 3, 3, 3, 3, 3]), 2) == [6]
    # Where all share the same prefix, the cuts fall near the even split, none empty.
    flat = np.array([0] + [2] * 9)
    assert cut_points(flat, 4) == [2, 5, 8]
    assert cut_points(flat[:3], 8) == [1, 2]
    assert cut_points(np.array([], dtype=np.int64), 3) == []


def test_pagedbatch_help_does_not_import_ray():
    code = "import sys; from pagedbatch.cli.app import app; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_the_driver_tells_the_eta_each_record_s_most_output_tokens():
    from pagedbatch.ray.ray_llm import _most_output_tokens
    from pagedbatch.requests.records import to_record
    from pagedbatch.sampling_params import SamplingParams

    defaults = SamplingParams(max_tokens=10)
    rows = [
        {"prompt": "a"},  # the defaults: 10
        {"prompt": "b", "max_tokens": 3, "n": 4},  # 12
        {"prompt": "c", "choices": ["x", "y"]},  # scored: nothing generated
        {"prompt": "d", "max_tokens": -5},  # fails on its replica
        {"messages": 7},  # not a record
    ]
    most = [_most_output_tokens(to_record(row, i), defaults) for i, row in enumerate(rows)]
    assert most == [10, 12, 0, 0, 0]


def _ray_job(args: list[str], cwd, env: dict) -> subprocess.Popen:
    """`pagedbatch run ARGS` as a real process with `env`, in a session of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "pagedbatch", "run", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _ray_env(**extra: str) -> dict:
    """This environment without RAY_ADDRESS (so --ray looks for a cluster), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


SMALL_JOB = ["--device", "cpu", "--num-blocks", "64", "--max-tokens", "8", "--max-num-seqs",
             "1", "--threads", "1", "--no-progress", "--ray", "--replicas", "1"]  # fmt: skip


def test_two_ray_jobs_at_once_each_run_on_a_cluster_of_their_own(tmp_path, tiny_model_dirs):
    """The second job used to join the local cluster the first started (Ray's "auto" finds
    any running one), and died with it when the first ended."""
    pytest.importorskip("ray")
    # The first job is long (it is interrupted once the second runs), the second short.
    first_rows = [{"id": f"a{i}", "prompt": f"story {i}", "max_tokens": 64} for i in range(2000)]
    write_jsonl(tmp_path / "a.jsonl", first_rows)
    rows = [{"id": f"b{i}", "prompt": f"tale {i}"} for i in range(24)]
    write_jsonl(tmp_path / "b.jsonl", rows)
    flags = ["-m", str(tiny_model_dirs["llama"]), *SMALL_JOB]
    env = _ray_env()
    first = _ray_job(["a.jsonl", "-o", "a.out.jsonl", *flags], tmp_path, env)
    second = None
    try:
        wait_for_lines(tmp_path / "a.out.jsonl", 1, first, timeout=300)  # its cluster is up
        second = _ray_job(["b.jsonl", "-o", "b.out.jsonl", *flags], tmp_path, env)
        wait_for_lines(tmp_path / "b.out.jsonl", 1, second, timeout=300)
        os.killpg(first.pid, signal.SIGINT)  # the first ends (and stops its cluster)
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 130, stderr
        _, stderr = second.communicate(timeout=300)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert second.returncode == 0, stderr
    assert set(by_id(read_lines(tmp_path / "b.out.jsonl"))) == {r["id"] for r in rows}


_CLUSTER = """
import logging, sys, ray
ray.init(num_cpus=6, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""


def test_a_cluster_lost_under_the_job_is_one_line_with_the_resume_command(
    tmp_path, tiny_model_dirs
):
    pytest.importorskip("ray")
    rows = [{"id": f"r{i}", "prompt": f"story {i}"} for i in range(400)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    env = _ray_env(RAY_AUTH_MODE="token")  # (a job given an address uses a token if told so)
    cluster = subprocess.Popen(
        [sys.executable, "-c", _CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, start_new_session=True, env=env,
    )  # fmt: skip
    job = None
    try:
        address = cluster.stdout.readline().strip()
        args = ["in.jsonl", "-o", "out.jsonl", "-m", str(tiny_model_dirs["llama"]), *SMALL_JOB]
        job = _ray_job([*args, "--ray-address", address], tmp_path, env)
        wait_for_lines(tmp_path / "out.jsonl", 2, job, timeout=300)
        cluster.stdin.close()  # its owner stops the cluster
        cluster.wait(timeout=120)
        _, stderr = job.communicate(timeout=120)
    finally:
        for process in (cluster, job):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert job.returncode == 1, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"error: lost the Ray cluster at {address}"), line
    assert "Resume with: pagedbatch run in.jsonl" in line and line.endswith("--resume"), line
    lines = read_lines(tmp_path / "out.jsonl")
    assert 2 <= len(by_id(lines)) < len(rows)
