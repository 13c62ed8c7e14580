"""Peak RSS of `lmforge prepare` on ONE big plain-text file (one document per file, issue 22 item 4).

    python bench/prepare_txt.py --sizes-mb 64 1024 [--baseline-src DIR --baseline-mb 8] [--write bench/RESULTS.md]

A synthetic text file of each size is generated (lines of words drawn from a Zipf-like
vocabulary, with blank lines between paragraphs; deterministic), a 6,400-id byte-level BPE is
trained by `lmforge tokenizer train` on its first 4 MB, and `python -m lmforge prepare --input
big.txt --val-fraction 0` runs in a fresh process (one worker). Peak RSS is the largest sum of RSS
over that process and its children, sampled every 100 ms (bench/prepare.py's `watch_tree`).
`--baseline-src DIR` runs the same command with PYTHONPATH=DIR (an older lmforge tree, e.g.
`git archive <commit> lmforge | tar -x -C DIR`) on the `--baseline-mb` file, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import table, watch_tree  # noqa: E402  (bench/prepare.py)

SECTION = "## Prepare: one large .txt file (issue 22)"


def write_text(path: Path, megabytes: float, seed: int = 0) -> int:
    """~megabytes of text: 1 MB blocks of words (Zipf-ish), reshuffled per block."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "en", "ar", "is", "on", "the", "and", "of"]
    words = np.array(["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(5000)])
    probs = 1.0 / np.arange(1, len(words) + 1)
    probs /= probs.sum()
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picks = words[rng.choice(len(words), size=180_000, p=probs)]
            lines = [" ".join(picks[i : i + 12]) + "." for i in range(0, len(picks), 12)]
            block = "\n".join(line if i % 8 else "\n" + line for i, line in enumerate(lines)) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    return path.stat().st_size


def run_prepare(src: Path, tok: Path, out: Path, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "lmforge", "prepare", "--input", str(src), "--tokenizer", str(tok),
            "--out", str(out), "--val-fraction", "0", "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen(argv, env=env, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, cpu = watch_tree(proc)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed (exit {proc.returncode}): {stderr.strip()[-500:]}")
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": time.perf_counter() - t0, "cpu": cpu, "peak_rss": peak,
            "tokens": meta["summary"]["tokens"], "docs": meta["summary"]["documents"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[64, 1024])
    ap.add_argument("--baseline-src", default=None, help="an older lmforge source tree to compare with")
    ap.add_argument("--baseline-mb", type=float, default=8)
    ap.add_argument("--write", default=None, help="replace this script's section of a markdown file")
    args = ap.parse_args()
    from lmforge.tokenizer import train_tokenizer

    here = str(Path(__file__).resolve().parents[1])
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-txt-", dir=os.environ.get("BENCH_TMP")))
    rows = []
    try:
        sample = work / "sample.txt"
        write_text(sample, 4, seed=1)
        tok = train_tokenizer(sample, 6400, work / "tok", fmt="paragraphs")
        runs = [("baseline", args.baseline_mb, args.baseline_src)] if args.baseline_src else []
        runs += [("this tree", mb, here) for mb in args.sizes_mb]
        for label, mb, src in runs:
            big = work / f"big-{mb:g}.txt"
            size = write_text(big, mb) if not big.exists() else big.stat().st_size
            r = run_prepare(big, tok, work / "out", src)
            shutil.rmtree(work / "out", ignore_errors=True)
            row = {"code": label, "bytes": size, **r, "load": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            big.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([
        SECTION, "",
        f"Command: `python bench/prepare_txt.py {' '.join(sys.argv[1:])}`; Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores (shared). One synthetic .txt file = one document, "
        "`lmforge prepare --val-fraction 0`, 1 worker, 6,400-id BPE; peak RSS summed over the process tree.", "",
        table([
            (r["code"], f"{r['bytes'] / 1e6:,.0f} MB", f"{r['tokens']:,}", r["docs"], f"{r['seconds']:.0f}",
             f"{r['cpu']:.0f}", f"{r['peak_rss'] / 2**20:,.0f} MiB", f"{r['peak_rss'] / r['bytes']:.2f}",
             f"{r['load']:.1f}")
            for r in rows
        ], ("code", "text", "tokens", "docs", "wall s", "CPU s", "peak RSS", "RSS bytes per text byte", "load")),
        "",
    ])  # fmt: skip
    print(text)
    if args.write:
        path = Path(args.write)
        old = path.read_text(encoding="utf-8")
        if SECTION in old:
            head, rest = old.split(SECTION, 1)
            nxt = rest.find("\n## ")
            old = head + text + ("\n" + rest[nxt + 1 :] if nxt >= 0 else "")
        else:
            old = old.rstrip("\n") + "\n\n" + text
        path.write_text(old.rstrip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
