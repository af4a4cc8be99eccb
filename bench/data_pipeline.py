"""The SFT data path at scale: records/s and peak RSS for 10k, 100k and 1M generated short records, the growth
factor between sizes, and the cached second run against reading the cache; optionally the reading stage alone
on a ~1 GB jsonl.

Each measurement is its own process (peak RSS = its ru_maxrss from os.wait4) with a fresh TUNEKIT_CACHE_DIR
for the first run; the second run reuses it. The tokenizer is the embedded SmolLM2's (its real chat template).

    .venv/bin/python bench/data_pipeline.py [--sizes 10000,100000,1000000] [--big-gb 1.0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta river mountain cloud data model token answer quick brown fox jumps".split()

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from tunekit.config.schema import DataConfig, ModelConfig
from tunekit.models.load import load_tokenizer
from tunekit.data import pipeline
mode, path, model = sys.argv[1], sys.argv[2], sys.argv[-1]
tok = load_tokenizer(ModelConfig(name=model))
import datasets, pyarrow, trl.data_utils  # imported before the clock starts: every run pays them once
if mode == "read":
    from tunekit.config.schema import DataSource
    from pathlib import Path
    t = time.perf_counter()
    ds, _ = pipeline._normalise_to_arrow([DataSource(path=path, format="auto")], None, Path(sys.argv[3]), "train")
    print(json.dumps({"records": len(ds), "seconds": time.perf_counter() - t}))
    raise SystemExit
cfg = DataConfig(train=path, max_length=256, eval_split=0.01)
t = time.perf_counter()
data = pipeline.build_sft_data(cfg, tok, 0)
build = time.perf_counter() - t
folder = pipeline.data_cache_dir() / pipeline.cache_key(cfg, tok, 0)
t = time.perf_counter()
again = pipeline._load_cached(folder)
read_cache = time.perf_counter() - t
print(json.dumps({"records": data.stats.train_records + data.stats.eval_records, "seconds": build,
                  "cached": data.cached, "read_cache_seconds": read_cache, "tokens": data.stats.train_tokens}))
"""


def make_records(path: Path, n: int, seed: int = 0, pad_words: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            extra = " ".join(rng.choice(WORDS) for _ in range(pad_words))
            fh.write(json.dumps({"instruction": f"Add {a} and {b}. {extra}".strip(), "output": str(a + b)}) + "\n")
    return path


def measured(args: list[str], env: dict, model: str) -> tuple[dict, float, float]:
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args, model], cwd=ROOT, stdout=out, stderr=err,
                                text=True, env={**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(err.read()[-3000:])
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1]), usage.ru_maxrss / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--big-gb", type=float, default=1.0, help="size of the jsonl for the reading-only row; 0 = skip")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tunekit.models.load import resolve_model_path

    model = str(resolve_model_path("smollm2-135m"))  # the converted folder: a fresh cache dir must not re-convert
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tunekit-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| records | run | data-stage s | records/s | peak RSS MiB | read cache s |\n|---:|---|---:|---:|---:|---:|")
    for n in [int(x) for x in args.sizes.split(",")]:
        data = make_records(work / f"r{n}.jsonl", n)
        cache = work / f"cache{n}"
        shutil.rmtree(cache, ignore_errors=True)
        env = {"TUNEKIT_CACHE_DIR": str(cache)}
        for run in ("first", "cached"):
            res, rss, _ = measured(["build", str(data)], env, model)
            assert res["cached"] == (run == "cached"), res
            rows.append({"n": n, "run": run, "rss": rss, **res})
            print(f"| {n:,} | {run} | {res['seconds']:.2f} | {n / res['seconds']:,.0f} | {rss:.0f} "
                  f"| {res['read_cache_seconds']:.3f} |", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        data.unlink()
    first = [r for r in rows if r["run"] == "first"]
    for a, b in zip(first, first[1:]):
        print(f"{a['n']:,} -> {b['n']:,} records (x{b['n'] / a['n']:g}): time x{b['seconds'] / a['seconds']:.2f}, "
              f"peak RSS x{b['rss'] / a['rss']:.2f}")
    if args.big_gb > 0:
        big = work / "big.jsonl"
        per_record = 2300  # bytes of a record with 400 filler words
        n = int(args.big_gb * 2**30 / per_record)
        make_records(big, n, pad_words=400)
        size = big.stat().st_size
        res, rss, _ = measured(["read", str(big), str(work / "big.arrow")], {"TUNEKIT_CACHE_DIR": str(work)}, model)
        print(f"reading only: {size / 2**30:.2f} GiB jsonl, {res['records']:,} records, {res['seconds']:.1f} s "
              f"({size / 2**20 / res['seconds']:.0f} MiB/s), peak RSS {rss:.0f} MiB")
        big.unlink()
        (work / "big.arrow").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
