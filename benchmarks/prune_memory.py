"""Benchmark: peak memory and time of ``seap prune`` as the model grows in depth.

What it measures. For each depth of ``--depths`` it builds a random-weight Llama checkpoint
(float32 safetensors, with a small word-level tokenizer built in code) of one fixed width --
hidden 1024, intermediate 4096, 16 attention heads, 4 key/value heads (GQA), vocabulary
``--vocab`` (2048) -- and, with ``--llama-1b`` (the default), one model shaped like
Llama-3.2-1B (hidden 2048, intermediate 8192, 32 heads, 8 key/value heads, 16 layers). Each
model is pruned by

    seap prune --model DIR --calib CALIB.jsonl --sparsity 0.3 --out OUT --workdir WORK --json [PRUNE_ARGS]

in a fresh process under ``/usr/bin/time -f '%M %e'`` (peak resident memory in KiB, wall
seconds), with a fresh ``--workdir`` and a fresh ``$SEAP_CACHE_DIR`` (and ``$HF_HOME``,
``$SEAP_LOG_DIR``) per run, all under the scratch folder, so that nothing is reused between
runs; the model, its pruned copy and the caches are deleted after each run to bound the disk.
The calibration file is generated deterministically (``--records`` records of ``--words``
words drawn with a fixed seed from the tokenizer's vocabulary), one task (``bench``), so
``seap prune`` builds a SEAP expert with its defaults (refit included).

It reports, as a markdown table on stdout (and as JSON with ``--json PATH``): depth,
parameters, weight size (fp32 GiB), peak RSS (GiB), wall time and time per decoder layer,
and the summary figure the project's target is stated in:

    RSS growth / weight growth = (peak RSS at depth R - peak RSS at the smallest depth)
                                 / (fp32 weight bytes at depth R - those at the smallest depth)

with R = ``--ratio-depth`` (24; the largest depth run if 24 is not among ``--depths``). An
engine that holds the whole model in memory scores about 100% or more; the target is at
most 25% (peak memory grows by at most a quarter of the weight bytes added). The
Llama-3.2-1B-shaped model is not part of the ratio (its width differs).

Memory and time belong to the machine (its cores, threads, memory bandwidth): compare runs
made on the same machine only; the script prints the machine and the date with the table.

Usage (from the repository root, in its virtual environment)::

    .venv/bin/python benchmarks/prune_memory.py                      # depths 8 16 24 32 + Llama-1B shape
    .venv/bin/python benchmarks/prune_memory.py --depths 8 24 --no-llama-1b --json before.json
    .venv/bin/python benchmarks/prune_memory.py --depths 2 4 --no-llama-1b --samples 8 \\
        --prune-args "--protect-first 0 --protect-last 0"             # smoke run, about 2 minutes
    .venv/bin/python benchmarks/prune_memory.py --prune-args "--no-reconstruct"          # compare settings
    git archive HEAD seap | tar -x -C /tmp/seap-head                  # another version of seap:
    .venv/bin/python benchmarks/prune_memory.py --seap-src /tmp/seap-head ...            # benchmark that one

Depths of 4 or fewer need ``--protect-first``/``--protect-last`` (seap keeps the first and last
two layers dense by default; the script says so up front). ``--run-timeout SECONDS`` stops a
run that takes too long and reports its peak memory so far and its time as lower bounds
(marked ``>=``). ``--workdir DIR`` keeps the scratch folder (an empty or new folder) instead
of a temporary one removed at the end; ``--keep`` also keeps every run's model, output and
caches there. The default configuration takes long on a small machine (the 1B-shaped model
alone needs about 4 GiB of weights in memory and a few GiB more on disk); the script checks
the free disk space before it starts. Progress goes to stderr, one line per run; the table
to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TIME_BIN = "/usr/bin/time"
GIB = 1024 ** 3

WIDTH = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_key_value_heads": 4}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_hidden_layers": 16}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk
PUNCTUATION = (".", ",")
TASK = "bench"

# options the benchmark sets itself: --prune-args may not repeat them
OWN_OPTIONS = ("--model", "--calib", "--out", "--workdir", "--sparsity", "--overwrite", "--help", "-h")


# ----------------------------------------------------------------------------- what is built


def vocabulary(size: int) -> list[str]:
    """``size`` tokens: the special tokens, punctuation, then pronounceable made-up words
    (consonant-vowel syllables), the same list for the same size."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 70, two letters each: words never collide
    n_words = size - len(SPECIAL_TOKENS) - len(PUNCTUATION)
    words: list[str] = []
    for length in range(1, 4):  # 70 + 4900 + 343000 words
        words.extend("".join(parts) for parts in itertools.product(syllables, repeat=length))
        if len(words) >= n_words:
            break
    return [*SPECIAL_TOKENS, *PUNCTUATION, *words[:n_words]]


def make_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer of exactly ``vocab_size`` tokens (the approach of
    tests/helpers.py ``make_tokenizer``, with a made-up vocabulary of the model's size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary(vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=4096)


def write_calibration(path: Path, vocab_size: int, records: int, words: int, seed: int) -> None:
    """``records`` JSONL records ``{"task": "bench", "text": ...}`` of ``words`` words each,
    drawn with ``seed`` from the vocabulary (Zipf-like frequencies), in sentences of 6-20 words."""
    rng = random.Random(seed)
    lexicon = vocabulary(vocab_size)[len(SPECIAL_TOKENS) + len(PUNCTUATION):]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    lines = []
    for _ in range(records):
        drawn = rng.choices(lexicon, weights=weights, k=words)
        sentences, i = [], 0
        while i < len(drawn):
            n = rng.randint(6, 20)
            sentences.append(" ".join(drawn[i:i + n]) + " .")
            i += n
        lines.append(json.dumps({"task": TASK, "text": " ".join(sentences)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_model(folder: str, shape: dict[str, int], vocab_size: int, seed: int) -> int:
    """Save a random float32 Llama of ``shape`` and its tokenizer in ``folder``; returns the
    parameter count. Runs in a child process (see :func:`build_in_child`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(vocab_size)
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         **shape)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return params


def build_in_child(folder: Path, shape: dict[str, int], vocab_size: int, seed: int, log: Path) -> int:
    """Build the model in a separate Python process, so that this process never holds a model
    (it stays small while ``seap prune`` runs beside it)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import prune_memory as b; "
            "print(json.dumps(b.build_model(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))")
    cmd = [sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(folder), json.dumps(shape),
           str(vocab_size), str(seed)]
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(log.parent),
                              check=False)
    if proc.returncode != 0:
        raise BenchError(f"building the model in {folder} failed (exit {proc.returncode}); "
                         f"last lines of {log}:\n{tail(log)}")
    return int(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- running


class BenchError(Exception):
    """A failure to report in one line (plus a log tail), without a traceback."""


@dataclass
class Row:
    label: str
    depth: int
    params: int
    weight_bytes: int
    peak_rss_kib: int
    wall_s: float
    seconds_per_layer: float
    build_s: float
    in_ratio: bool
    timed_out: bool = False  # stopped at --run-timeout: peak RSS and wall time are lower bounds
    seap: dict[str, Any] = field(default_factory=dict)  # seap prune --json summary (timings, sparsity)

    @property
    def weight_gib(self) -> float:
        return self.weight_bytes / GIB

    @property
    def peak_rss_gib(self) -> float:
        return self.peak_rss_kib * 1024 / GIB


SEAP_SRC: Path | None = None  # --seap-src: a folder holding the seap package to benchmark


def child_env(run_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if SEAP_SRC is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(SEAP_SRC), *filter(None, [env.get("PYTHONPATH")])])
    if run_dir is None:
        return env
    env.update(SEAP_CACHE_DIR=str(run_dir / "seap-cache"), HF_HOME=str(run_dir / "hf-home"),
               SEAP_LOG_DIR=str(run_dir / "logs"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def seap_source() -> str:
    """Where the benchmarked seap package lives, with its git commit (and '+dirty' when its
    seap/ folder has uncommitted changes) if it is a git checkout."""
    probe = subprocess.run([sys.executable, "-c", "import seap; print(seap.__file__)"], capture_output=True,
                           text=True, env=child_env(), cwd=tempfile.gettempdir(), check=False)  # not '' = the current folder
    if probe.returncode != 0:
        return "?"
    package = Path(probe.stdout.strip()).parent
    where = str(package)
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False)
    if head.returncode == 0:
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "."], capture_output=True,
                               text=True, check=False).stdout.strip()
        where += f" (git {head.stdout.strip()}{'+dirty' if dirty else ''})"
    return where


def seap_command() -> list[str]:
    """The ``seap`` entry point of this interpreter's environment (else ``python -m seap``)."""
    script = Path(sys.executable).parent / "seap"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "seap"]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.extend(int(c) for c in task.read_text().split())
        except OSError:
            pass
    return found


def high_water_kib(pid: int) -> int:
    """The peak resident memory so far (VmHWM, KiB) of a live process, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class PruneRun:
    peak_rss_kib: int
    wall_s: float
    summary: dict[str, Any]
    timed_out: bool = False


def run_prune(model_dir: Path, calib: Path, run_dir: Path, sparsity: float, extra: list[str],
              limit_s: float | None = None) -> PruneRun:
    """``seap prune`` in a fresh process under /usr/bin/time. Past ``limit_s`` seconds it is
    stopped, and the peak so far (its VmHWM, sampled every second) and the time spent are
    returned as lower bounds (``timed_out``)."""
    timing = run_dir / "time.txt"
    log = run_dir / "prune.log"
    cmd = [TIME_BIN, "-f", "%M %e", "-o", str(timing), *seap_command(), "prune", "--model", str(model_dir),
           "--calib", str(calib), "--sparsity", str(sparsity), "--out", str(run_dir / "out"),
           "--workdir", str(run_dir / "work"), "--json", *extra]
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    start = time.perf_counter()
    peak, timed_out = 0, False
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir, env=child_env(run_dir))
        try:
            while proc.poll() is None:
                kids = children(proc.pid)
                peak = max([peak, *(high_water_kib(k) for k in kids)])
                if limit_s is not None and time.perf_counter() - start > limit_s:
                    timed_out = True
                    for kid in kids:  # stop seap itself: /usr/bin/time then exits with its status
                        try:
                            os.kill(kid, 15)
                        except ProcessLookupError:
                            pass
                    proc.wait()
                    break
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:  # interrupted: leave no seap process behind
            for kid in children(proc.pid):
                try:
                    os.kill(kid, 15)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
            raise
    if timed_out:
        return PruneRun(peak, time.perf_counter() - start, {}, timed_out=True)
    if proc.returncode != 0:
        raise BenchError(f"seap prune failed (exit {proc.returncode}) on {model_dir}; last lines of {log}:\n{tail(log)}")
    try:
        fields = timing.read_text().split()
        kib, wall = int(fields[-2]), float(fields[-1])
    except (OSError, ValueError, IndexError) as exc:
        raise BenchError(f"could not read /usr/bin/time's output {timing}: {exc}") from None
    return PruneRun(kib, wall, parse_summary(log))


def parse_summary(log: Path) -> dict[str, Any]:
    """The JSON object ``seap prune --json`` prints (last in its output), or {} if absent."""
    text = log.read_text(encoding="utf-8", errors="replace")
    start = text.rfind("\n{")
    start = 0 if text.startswith("{") and start < 0 else start + 1
    try:
        data = json.loads(text[start:text.rindex("}") + 1])
    except ValueError:
        return {}
    return {k: data[k] for k in ("realised_sparsity", "dense_params", "pruned_params", "timings") if k in data}


def say(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or "", "machine": platform.machine(),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch_threads_env": os.environ.get("OMP_NUM_THREADS")}


def growth_ratio(rows: list[Row], ratio_depth: int) -> dict[str, Any] | None:
    series = sorted((r for r in rows if r.in_ratio), key=lambda r: r.depth)
    if len(series) < 2:
        return None
    low = series[0]
    high = next((r for r in series if r.depth == ratio_depth), series[-1])
    if low.timed_out:  # the smallest run's figures are only lower bounds: no growth can be stated
        return None
    d_rss = (high.peak_rss_kib - low.peak_rss_kib) * 1024
    d_weights = high.weight_bytes - low.weight_bytes
    return {"from_depth": low.depth, "to_depth": high.depth, "rss_growth_gib": d_rss / GIB,
            "weight_growth_gib": d_weights / GIB, "ratio": d_rss / d_weights, "target": 0.25,
            "seconds_per_added_layer": (high.wall_s - low.wall_s) / (high.depth - low.depth),
            "lower_bound": high.timed_out}  # the deeper run was stopped: its peak so far


def markdown(rows: list[Row], ratio: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    m = meta["machine"]
    out = [(f"Machine: {m['cpu_count']} CPUs, processor {m['processor'] or '?'} ({m['machine']}), {m['system']}, "
            f"Python {m['python']}; date {meta['date']}"),
           f"seap package: {meta['seap_source']}",
           (f"seap prune --sparsity {meta['sparsity']} {meta['prune_args']}".rstrip()
            + f"; calibration {meta['records']} records x {meta['words']} words, vocab {meta['vocab']}"),
           "",
           "| model | depth | parameters | weights fp32 (GiB) | peak RSS (GiB) | RSS / weights | wall (s) | s / layer |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ge = ">=" if r.timed_out else ""
        out.append(f"| {r.label}{' (stopped)' if r.timed_out else ''} | {r.depth} | {r.params / 1e6:,.1f} M | "
                   f"{r.weight_gib:.3f} | {ge}{r.peak_rss_gib:.2f} | {ge}{r.peak_rss_gib / r.weight_gib:.2f} | "
                   f"{ge}{r.wall_s:.1f} | {ge}{r.seconds_per_layer:.2f} |")
    if any(r.timed_out for r in rows):
        out.append("")
        out.append(f"(stopped: cut off at --run-timeout {meta['run_timeout']:g} s; >= marks the peak so far and the "
                   "time spent, lower bounds)")
    out.append("")
    if ratio is None:
        out.append("RSS growth / weight growth: n/a (needs two depths of the 1024-wide series, the smallest "
                   "one complete)")
    else:
        ge = ">=" if ratio["lower_bound"] else ""
        verdict = "meets" if ratio["ratio"] <= ratio["target"] and not ratio["lower_bound"] else \
            ("misses" if ratio["ratio"] > ratio["target"] else "so far within")
        out.append(f"RSS growth / weight growth, depth {ratio['from_depth']} -> {ratio['to_depth']}: "
                   f"{ge}{ratio['rss_growth_gib']:+.2f} GiB / {ratio['weight_growth_gib']:+.2f} GiB = "
                   f"{ge}{100 * ratio['ratio']:.0f}% ({verdict} the target of at most {100 * ratio['target']:.0f}%)")
        out.append(f"Wall time per added layer, depth {ratio['from_depth']} -> {ratio['to_depth']}: "
                   f"{ge}{ratio['seconds_per_added_layer']:.2f} s")
    return "\n".join(out)


# ----------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="prune_memory.py", description=doc.split("\n\n")[0],
                                epilog="See the module docstring (top of benchmarks/prune_memory.py) for details.")
    p.add_argument("--depths", type=int, nargs="*", default=[8, 16, 24, 32], metavar="N",
                   help="decoder layers of the 1024-wide models (default: 8 16 24 32)")
    p.add_argument("--llama-1b", action=argparse.BooleanOptionalAction, default=True,
                   help="also prune one Llama-3.2-1B-shaped model (hidden 2048, 16 layers) (default: on)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size of models and tokenizer (default: 2048)")
    p.add_argument("--sparsity", type=float, default=0.3, help="seap prune --sparsity (default: 0.3)")
    p.add_argument("--samples", type=int, default=None,
                   help="pass --samples N to seap prune (calibration records used; default: seap's own)")
    p.add_argument("--prune-args", default="", metavar="'ARGS'",
                   help="further seap prune options, one quoted string, e.g. \"--no-reconstruct --max-tokens 256\"")
    p.add_argument("--records", type=int, default=64, help="records in the calibration file (default: 64)")
    p.add_argument("--words", type=int, default=300, help="words per calibration record (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the calibration text (default: 0)")
    p.add_argument("--ratio-depth", type=int, default=24,
                   help="depth the RSS/weight growth ratio is taken at, from the smallest depth (default: 24; "
                        "the largest depth run if absent)")
    p.add_argument("--run-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a prune run after this long and report its peak RSS so far and its time as lower "
                        "bounds, marked >= (default: no limit)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch folder, kept (new or empty; default: a temporary folder removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep every run's model, output and caches in --workdir")
    p.add_argument("--seap-src", type=Path, default=None, metavar="DIR",
                   help="benchmark the seap package in DIR/seap (put first on the children's PYTHONPATH), e.g. an "
                        "export of another commit: git archive HEAD seap | tar -x -C DIR (default: the installed one)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON here")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # argparse takes no value that starts with '-': glue it on
        if arg == "--prune-args":
            argv[i:i + 2] = [f"--prune-args={argv[i + 1]}"]
            break
    args = p.parse_args(argv)

    if any(d < 1 for d in args.depths):
        p.error(f"--depths must be positive layer counts, got {args.depths}")
    if len(set(args.depths)) != len(args.depths):
        p.error(f"--depths has a depth twice: {args.depths}")
    args.depths = sorted(args.depths)
    if not args.depths and not args.llama_1b:
        p.error("nothing to run: give --depths, or leave --llama-1b on")
    min_vocab = len(SPECIAL_TOKENS) + len(PUNCTUATION) + 16
    if not min_vocab <= args.vocab <= 100_000:
        p.error(f"--vocab must be in [{min_vocab}, 100000], got {args.vocab}")
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.samples is not None and args.samples < 1:
        p.error(f"--samples must be 1 or more, got {args.samples}")
    if args.records < 1 or args.words < 1:
        p.error(f"--records and --words must be 1 or more, got {args.records} and {args.words}")
    if args.run_timeout is not None and args.run_timeout <= 0:
        p.error(f"--run-timeout must be positive seconds, got {args.run_timeout}")
    if args.ratio_depth < 1:
        p.error(f"--ratio-depth must be positive, got {args.ratio_depth}")
    try:
        extra = shlex.split(args.prune_args)
    except ValueError as exc:
        p.error(f"--prune-args is not a valid shell-quoted string: {exc}")
    names = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
    clash = [n for n in names if n in OWN_OPTIONS or (n.startswith("--") and len(n) > 2 and n not in
                                                       ("--samples", "--seed") and
                                                       any(o.startswith(n) for o in OWN_OPTIONS))]
    if clash:
        p.error(f"--prune-args may not set {', '.join(clash)}: the benchmark passes --model, --calib, --out, "
                "--workdir and --sparsity itself (set the sparsity with its own --sparsity)")
    protected = 4  # seap's logistic schedule keeps 2 first and 2 last layers dense by default
    sets_protection = any(n.startswith(("--protect", "--schedule")) for n in names)
    shallow = [d for d in args.depths if d <= protected]
    if shallow and not sets_protection:
        p.error(f"depth(s) {shallow}: seap prune keeps the first 2 and the last 2 layers dense by default, so "
                f"nothing would be pruned; use depths of {protected + 1} or more, or pass "
                "--prune-args \"--protect-first 0 --protect-last 0\"")
    if args.samples is not None:
        if any(a.split("=", 1)[0] == "--samples" for a in extra):
            p.error("give --samples either directly or inside --prune-args, not both")
        extra = ["--samples", str(args.samples), *extra]
    args.extra = extra
    if args.keep and args.workdir is None:
        p.error("--keep needs --workdir (a temporary folder is removed at the end)")
    if args.workdir is not None and args.workdir.exists() and (not args.workdir.is_dir()
                                                              or any(args.workdir.iterdir())):
        p.error(f"--workdir {args.workdir} exists and is not an empty folder: pass a new or empty one")
    if args.json is not None and (args.json.is_dir() or not (args.json.parent.resolve().is_dir())):
        p.error(f"--json {args.json}: not a file path in an existing folder")
    if not os.access(TIME_BIN, os.X_OK):
        p.error(f"{TIME_BIN} (GNU time) is needed to measure peak memory; install it (apt-get install time)")
    if args.seap_src is not None:
        if not (args.seap_src / "seap" / "__init__.py").is_file():
            p.error(f"--seap-src {args.seap_src}: no seap package there (expected {args.seap_src}/seap/__init__.py)")
        global SEAP_SRC
        SEAP_SRC = args.seap_src.resolve()
    probe = subprocess.run([*seap_command(), "prune", "--help"], capture_output=True, text=True, env=child_env(),
                           check=False)
    if probe.returncode != 0:
        p.error(f"`{shlex.join(seap_command())} prune --help` failed: is seap installed in this environment?")
    unknown = [a for a in extra if a.startswith("--") and a.split("=", 1)[0] not in probe.stdout]
    if unknown:
        p.error(f"--prune-args: seap prune has no option {', '.join(unknown)} (see `seap prune --help`)")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, dict[str, int], bool]]:
    runs = [(f"llama-{d}L", {**WIDTH, "num_hidden_layers": d}, True) for d in args.depths]
    if args.llama_1b:
        runs.append(("llama-3.2-1b shape", dict(LLAMA_1B), False))
    return runs


def count_params(shape: dict[str, int], vocab: int) -> int:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + 2 * vocab * h + h


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    temporary = args.workdir is None
    scratch = Path(tempfile.mkdtemp(prefix="seap-prune-memory-")) if temporary else args.workdir.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    # each run holds its model (fp32) and its pruned copy on disk at once, plus small caches
    need = max(count_params(shape, args.vocab) for _, shape, _ in runs) * 4 * 2.2 + 0.5 * GIB
    free = shutil.disk_usage(scratch).free
    if free < need:
        say(f"prune_memory.py: error: {scratch} has {free / GIB:.1f} GiB free, the largest run needs about "
            f"{need / GIB:.1f} GiB")
        return 2
    meta = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
            "sparsity": args.sparsity, "prune_args": shlex.join(args.extra), "records": args.records,
            "words": args.words, "vocab": args.vocab, "seed": args.seed, "seap": shlex.join(seap_command()),
            "seap_source": seap_source(), "run_timeout": args.run_timeout}
    rows: list[Row] = []
    try:
        calib = scratch / "calib.jsonl"
        write_calibration(calib, args.vocab, args.records, args.words, args.seed)
        say(f"scratch {scratch}; calibration {calib.name}: {args.records} records x {args.words} words; "
            f"{len(runs)} run(s)")
        for index, (label, shape, in_ratio) in enumerate(runs, start=1):
            depth = shape["num_hidden_layers"]
            run_dir = scratch / f"run-{index:02d}-{label.replace(' ', '_')}"
            run_dir.mkdir()
            say(f"[{index}/{len(runs)}] {label:<20} build", end="")
            t0 = time.perf_counter()
            params = build_in_child(run_dir / "model", shape, args.vocab, args.seed + depth, run_dir / "build.log")
            build_s = time.perf_counter() - t0
            say(f" {build_s:5.1f} s, {params / 1e6:7.1f} M params, {params * 4 / GIB:5.2f} GiB | prune", end="")
            res = run_prune(run_dir / "model", calib, run_dir, args.sparsity, args.extra, args.run_timeout)
            row = Row(label, depth, params, params * 4, res.peak_rss_kib, res.wall_s, res.wall_s / depth, build_s,
                      in_ratio, res.timed_out, res.summary)
            rows.append(row)
            sparsity = res.summary.get("realised_sparsity")
            ge = ">=" if res.timed_out else ""
            say(f" peak RSS {ge}{row.peak_rss_gib:5.2f} GiB, {ge}{row.wall_s:7.1f} s "
                f"({ge}{row.seconds_per_layer:5.2f} s/layer)"
                + (f", realised sparsity {sparsity:.3f}" if isinstance(sparsity, (int, float)) else "")
                + (f"; STOPPED at --run-timeout {args.run_timeout:g} s (lower bounds)" if res.timed_out else ""))
            if not args.keep:
                for name in ("model", "out", "work", "seap-cache", "hf-home"):
                    shutil.rmtree(run_dir / name, ignore_errors=True)
    except BenchError as exc:
        say("")
        say(f"prune_memory.py: error: {exc}")
        if temporary:
            say(f"(the scratch folder {scratch} is kept for inspection)")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        if temporary:
            shutil.rmtree(scratch, ignore_errors=True)
        return 130
    ratio = growth_ratio(rows, args.ratio_depth)
    print(markdown(rows, ratio, meta))
    if args.json is not None:
        payload = {**meta, "runs": [{**asdict(r), "label": r.label, "weight_gib": r.weight_gib,
                                     "peak_rss_gib": r.peak_rss_gib} for r in rows],
                   "rss_growth_over_weight_growth": ratio}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        say(f"wrote {args.json}")
    if temporary:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
