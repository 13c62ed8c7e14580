"""Benchmark `lmforge prepare` against the bare `tokenizers` encoder on a real corpus.

    python bench/prepare.py [--corpus /work/data_cache/wiki-en/wiki-en.jsonl] [--tokenizer DIR]
                            [--workers 1 2] [--scale 4] [--write bench/RESULTS.md]

Every encoder runs single-threaded (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false, set
before `tokenizers` is imported), so "per worker" means per process. Without --tokenizer a
6,400-id byte-level BPE is trained on the corpus first (MiniMind's size). Each prepare runs in a
fresh Python process; its peak RSS is the largest sum of RSS over that process and its workers,
sampled every 20 ms with psutil. The corpus is also repeated --scale times into one file to show
that peak memory does not grow with corpus size.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT_CORPUS = "/work/data_cache/wiki-en/wiki-en.jsonl"
SECTION = "## Prepare"


def peak_rss_of(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for `proc`; return (peak summed RSS of it and its children in bytes, wall seconds)."""
    import psutil

    start = time.perf_counter()
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            total = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
        except psutil.Error:
            total = 0
        peak = max(peak, total)
        time.sleep(0.02)
    return peak, time.perf_counter() - start


def run_prepare(corpus: Path, tok: Path, out: Path, workers: int) -> dict:
    """One prepare in a fresh process (so RSS is its own); returns its summary plus peak RSS."""
    code = (
        "import json, sys; from lmforge.data.prepare import prepare_dataset; "
        f"s = prepare_dataset({str(corpus)!r}, {str(tok)!r}, {str(out)!r}, workers={workers}, "
        "progress=False, overwrite=True); print(json.dumps(s))"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    peak = [0]
    t = threading.Thread(target=lambda: peak.__setitem__(0, peak_rss_of(proc)[0]))
    t.start()
    stdout, _ = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare with {workers} workers failed (exit {proc.returncode})")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(stdout.strip().splitlines()[-1])
    summary["peak_rss"] = peak[0]
    # CPU seconds of the prepare process and every worker it reaped (incl. interpreter start-up).
    summary["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return summary


def bare_encoder(tok_dir: Path, texts: list[str], repeats: int = 2) -> dict:
    """Best-of-`repeats` tokens/s of tokenizers' encode_batch (and encode_batch_fast) on `texts`."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.encode_special_tokens = True  # as lmforge encodes: specials in text are text
    result = {}
    for name in ("encode_batch", "encode_batch_fast"):
        fn = getattr(raw, name, None)
        if fn is None:
            continue
        best = best_cpu = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = sum(len(e.ids) for e in fn(texts, add_special_tokens=False))
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        result[name] = {
            "tokens": tokens,
            "seconds": best,
            "tokens_per_s": tokens / best,
            "tokens_per_cpu_s": tokens / best_cpu,
        }
    return result


def _encode_part(tok_file: str, texts: list[str], barrier, queue) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(tok_file)
    raw.encode_special_tokens = True
    barrier.wait()
    t0 = time.perf_counter()
    tokens = sum(len(e.ids) for e in raw.encode_batch(texts, add_special_tokens=False))
    queue.put((tokens, t0, time.perf_counter()))


def bare_encoder_parallel(tok_dir: Path, texts: list[str], procs: int) -> dict:
    """`procs` processes each encode a contiguous 1/procs of `texts` at the same time (started
    together on a barrier): the ceiling for `procs` prepare workers on this machine."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    step = -(-len(texts) // procs)
    ps = [
        ctx.Process(
            target=_encode_part,
            args=(str(tok_dir / "tokenizer.json"), texts[i * step : (i + 1) * step], barrier, queue),
        )
        for i in range(procs)
    ]
    for proc in ps:
        proc.start()
    parts = [queue.get() for _ in ps]
    for proc in ps:
        proc.join()
    tokens = sum(t for t, _, _ in parts)
    seconds = max(e for _, _, e in parts) - min(s for _, s, _ in parts)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a 6,400-id BPE)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scale", type=int, default=4, help="also run on the corpus repeated this many times")
    ap.add_argument("--write", default=None, help="replace the '## Prepare' section of this markdown file")
    args = ap.parse_args()

    import psutil
    import tokenizers

    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise SystemExit(f"{corpus}: corpus not found; run `lmforge data fetch wiki-en --out ...` first")
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-prepare-"))
    try:
        if args.tokenizer:
            tok_dir = Path(args.tokenizer)
        else:
            t0 = time.perf_counter()
            tok_dir = train_tokenizer(corpus, 6400, work / "tok")
            print(f"trained a 6,400-id BPE in {time.perf_counter() - t0:.1f} s", flush=True)
        tok = load_tokenizer(tok_dir)
        big = work / f"x{args.scale}.jsonl"
        with open(big, "wb") as f:
            for _ in range(args.scale):
                f.write(corpus.read_bytes())
        texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line]
        ceiling = bare_encoder(tok_dir, texts)
        base_cpu = ceiling["encode_batch"]["tokens_per_cpu_s"]
        # Ceiling per worker count: the bare encoder in that many concurrent processes.
        parallel = {w: bare_encoder_parallel(tok_dir, texts, w) for w in args.workers}
        rows = []
        for label, path, mult in (("1x", corpus, 1), (f"{args.scale}x", big, args.scale)):
            for w in args.workers:
                s = run_prepare(path, tok_dir, work / f"out-{label}-{w}", w)
                # Content tokens (without the bos/eos prepare adds) so the rate compares with the encoder's.
                content = s["tokens"] - s["documents"] * (2 if tok.bos_id is not None else 1)
                rate = content / s["seconds"]
                rows.append(
                    (
                        label,
                        f"{path.stat().st_size / 1e6:.1f} MB",
                        w,
                        f"{content:,}",
                        f"{s['seconds']:.2f}",
                        f"{rate:,.0f}",
                        f"{parallel[w]['tokens_per_s']:,.0f}",
                        f"{100 * rate / parallel[w]['tokens_per_s']:.0f}%",
                        f"{s['cpu_seconds']:.2f}",
                        f"{100 * content / s['cpu_seconds'] / base_cpu:.0f}%",
                        f"{s['peak_rss'] / 2**20:.0f} MiB",
                    )
                )
                print(rows[-1], flush=True)
                assert content == ceiling["encode_batch"]["tokens"] * mult, "prepare and encoder disagree"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    header = (
        "corpus",
        "size",
        "workers",
        "tokens",
        "seconds",
        "tokens/s",
        "bare encoder, same number of processes, tokens/s",
        "prepare / bare encoder",
        "CPU s (all processes)",
        "tokens per CPU-s vs bare encoder",
        "peak RSS (all processes)",
    )
    ceil_rows = [
        (
            name,
            f"{c['tokens']:,}",
            f"{c['seconds']:.2f}",
            f"{c['tokens_per_s']:,.0f}",
            f"{c['tokens_per_cpu_s']:,.0f}",
        )
        for name, c in ceiling.items()
    ]
    text = "\n".join(
        [
            SECTION,
            "",
            f"Command: `python bench/prepare.py --corpus {corpus}{' --tokenizer ' + str(args.tokenizer) if args.tokenizer else ''} "
            f"--workers {' '.join(map(str, args.workers))} --scale {args.scale}`",
            "",
            f"Machine: {psutil.cpu_count()} CPU cores ({cpu}), shared with other jobs (load average at the end "
            f"{load[0]:.1f}); Python {platform.python_version()}, tokenizers {tokenizers.__version__}. "
            f"Tokenizer: {tok.name} ({'trained by the bench on the corpus' if not args.tokenizer else tok_dir}). "
            "All encoders single-threaded (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false).",
            "",
            "Ceiling, bare `tokenizers` on the 1x texts already in memory (best of 2):",
            "",
            table(ceil_rows, ("encoder", "tokens", "seconds", "tokens/s", "tokens per CPU-s")),
            "",
            table(
                [
                    (w, f"{c['tokens']:,}", f"{c['seconds']:.2f}", f"{c['tokens_per_s']:,.0f}")
                    for w, c in parallel.items()
                ],
                ("concurrent encode_batch processes", "tokens", "seconds", "tokens/s (all processes)"),
            ),
            "",
            "`prepare_dataset` end to end (hash sources, read JSONL, tokenize, write shards and meta), "
            "each in a fresh process; tokens exclude the bos/eos prepare adds. `prepare / bare encoder` "
            "compares prepare with N workers against N concurrent processes that only run `encode_batch` "
            "on their share of the 1x texts (measured just before, so under similar load). Wall-clock "
            "rates on a shared machine follow the load; tokens per CPU-second (all processes, interpreter "
            "and worker start-up included) over the single-process encoder's is the load-independent "
            "measure of prepare's overhead:",
            "",
            table(rows, header),
            "",
        ]
    )
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
