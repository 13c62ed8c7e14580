"""Benchmark `lmforge prepare` (local and Ray engines) against the bare `tokenizers` encoder.

    python bench/prepare.py --corpus 'DIR/*.jsonl' [--tokenizer DIR] [--workers 1 2]
                            [--engines local ray] [--sample FILE] [--write bench/RESULTS.md]

Every encoder runs single-threaded (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false, set
before `tokenizers` is imported), so "per worker" means per process. Without --tokenizer a
6,400-id byte-level BPE is trained on the first 20,000 documents of the sample file. The bare
encoder's tokens per CPU-second is measured on the sample (a file of the corpus, held in memory).
Each prepare runs in a fresh Python process; its peak RSS is the largest sum of RSS over that
process and all its descendants (workers, and for Ray the raylet, GCS and worker processes),
sampled every 100 ms with psutil; its CPU time is the sum over every process of the tree (each
process's last sample, plus what the reaped children reported).
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SECTION = "## Prepare"


def watch_tree(proc: subprocess.Popen, log=None) -> tuple[int, float]:
    """Wait for `proc`; (peak summed RSS of its process tree in bytes, CPU seconds of the tree).
    CPU is user+system of each process at its last sample (never children_* times: reaped
    children would be counted twice); `log` gets a line every 10 s."""
    import psutil

    root = psutil.Process(proc.pid)
    peak, cpu, last = 0, {}, time.perf_counter()
    while proc.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                total += p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        peak = max(peak, total)
        if log is not None and time.perf_counter() - last > 10:
            last = time.perf_counter()
            print(f"watch: peak RSS {peak / 2**20:.0f} MiB, CPU {sum(cpu.values()):.0f} s", file=log, flush=True)
        time.sleep(0.1)
    return peak, sum(cpu.values())


def run_prepare(corpus: list[str], tok: Path, out: Path, workers: int, engine: str) -> dict:
    code = (
        "import json; from lmforge.data.prepare import prepare_dataset; "
        f"s = prepare_dataset({corpus!r}, {str(tok)!r}, {str(out)!r}, workers={workers}, engine={engine!r}, "
        "progress=True, overwrite=True); print(json.dumps(s))"
    )
    log = open(os.environ["BENCH_LOG"], "a") if os.environ.get("BENCH_LOG") else None  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL,
                            text=True)
    peak, cpu = watch_tree(proc, log)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"prepare {engine} with {workers} workers failed (exit {proc.returncode})")
    summary = json.loads(stdout.strip().splitlines()[-1])
    summary["peak_rss"], summary["cpu_seconds"] = peak, cpu
    return summary


def bare_encoder(tok_dir: Path, texts: list[str], repeats: int = 2) -> dict:
    """Best-of-`repeats` tokens/s and tokens per CPU-second of tokenizers' encode_batch on `texts`."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    best = best_cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = sum(len(e.ids) for e in raw.encode_batch(texts, add_special_tokens=False))
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best, "tokens_per_cpu_s": tokens / best_cpu}


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", required=True, help="files or globs (JSON lines)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a 6,400-id BPE)")
    ap.add_argument("--sample", default=None, help="file for the bare-encoder ceiling (default: first corpus file)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--label", default="", help="corpus label for the table")
    ap.add_argument("--append", default=None, help="append the JSON rows to this file")
    ap.add_argument("--write", default=None, help="replace the '## Prepare' section of this markdown file")
    args = ap.parse_args()

    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    files = sorted(f for pattern in args.corpus for f in glob.glob(pattern))
    if not files:
        raise SystemExit(f"{args.corpus}: no corpus files")
    size = sum(Path(f).stat().st_size for f in files)
    sample = Path(args.sample or files[0])
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-prepare-", dir=os.environ.get("BENCH_TMP")))
    rows = []
    try:
        tok_dir = Path(args.tokenizer) if args.tokenizer else train_tokenizer(sample, 6400, work / "tok", max_docs=20_000)
        tok = load_tokenizer(tok_dir)
        texts = [json.loads(line)["text"] for line in sample.read_text(encoding="utf-8").splitlines() if line]
        ceiling = bare_encoder(tok_dir, texts)
        print(f"bare encode_batch: {ceiling}", flush=True)
        for engine in args.engines:
            for w in args.workers:
                s = run_prepare(files, tok_dir, work / f"out-{engine}-{w}", w, engine)
                content = s["tokens"] - s["documents"] * (2 if tok.bos_id is not None else 1)
                row = {
                    "corpus": args.label or f"{len(files)} files",
                    "bytes": size,
                    "engine": engine,
                    "workers": w,
                    "tokens": content,
                    "seconds": s["seconds"],
                    "tokens_per_s": content / s["seconds"],
                    "cpu_seconds": s["cpu_seconds"],
                    "per_cpu_vs_bare": content / s["cpu_seconds"] / ceiling["tokens_per_cpu_s"],
                    "peak_rss": s["peak_rss"],
                    "bare_tokens_per_cpu_s": ceiling["tokens_per_cpu_s"],
                    "load": os.getloadavg()[0],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.append:
                    with open(args.append, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                shutil.rmtree(work / f"out-{engine}-{w}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([
        SECTION, "",
        f"Command: `python bench/prepare.py --corpus {' '.join(args.corpus)} --workers {' '.join(map(str, args.workers))} "
        f"--engines {' '.join(args.engines)}`; {platform.python_version()}, {platform.machine()}.", "",
        f"Bare `encode_batch` on {sample.name}: {ceiling['tokens_per_cpu_s']:,.0f} tokens per CPU-second.", "",
        table([
            (r["corpus"], f"{r['bytes'] / 1e9:.2f} GB", r["engine"], r["workers"], f"{r['tokens']:,}",
             f"{r['seconds']:.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['cpu_seconds']:.0f}",
             f"{100 * r['per_cpu_vs_bare']:.0f}%", f"{r['peak_rss'] / 2**20:.0f} MiB")
            for r in rows
        ], ("corpus", "size", "engine", "workers", "tokens", "seconds", "tokens/s", "CPU s (tree)",
            "tokens per CPU-s vs bare encoder", "peak RSS (tree)")),
        "",
    ])  # fmt: skip
    print(text)
    if args.write:
        path = Path(args.write)
        old = path.read_text(encoding="utf-8") if path.exists() else "# lmforge benchmarks\n\n"
        if SECTION in old:
            head, rest = old.split(SECTION, 1)
            nxt = rest.find("\n## ")
            old = head + text + ("\n" + rest[nxt + 1 :] if nxt >= 0 else "")
        else:
            old = old.rstrip("\n") + "\n\n" + text
        path.write_text(old.rstrip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
