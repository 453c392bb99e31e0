"""Data at scale: load + validate + tokenize a million synthetic preference pairs, cold and then from the cache.

    python benchmarks/data_scale.py                                  # 1,000,000 pairs in ~/.cache/dpo_dist/data_scale
    python benchmarks/data_scale.py --pairs 200000 --dir /tmp/scale  # fewer pairs, elsewhere

The pairs (text format, UltraFeedback-like lengths: prompt/chosen/rejected of about 110/240/190 words, log-normal)
are written once to one parquet file (in chunks, so writing them takes bounded memory too). Then the data pipeline
that training runs (``load_pairs``: read into Arrow and validate every row with ``datasets.map``; ``tokenize_pairs``)
runs twice in a fresh subprocess with its own empty datasets cache: first (nothing cached), then second (the same
file and settings: the datasets cache). Printed per run: wall time, the peak RSS of the largest process (``wait4``'s
``ru_maxrss``, which covers the map workers too) and the peak of the summed RSS of the process tree (sampled every
0.2 s with psutil), the same two peaks of anonymous memory only (``RssAnon``: what the processes allocated,
without the file-backed pages), and the ratio of the second run's wall time to the first's. RSS counts the
memory-mapped Arrow pages a process has touched (file-backed pages the kernel can drop), so it is an upper bound on
what is needed.

The tokenizer is the built-in SmolLM2 one if it was converted (``~/.cache/dpo_dist/models/SmolLM2-135M-Instruct``,
see ``dpo_dist/model/builtin.py``), else the GPT-2 byte-level BPE trained here on the synthetic words.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LENGTHS = {"prompt": 110, "chosen": 240, "rejected": 190}  # median words per field (UltraFeedback-like)


def write_pairs(path: str, pairs: int, seed: int = 0, chunk: int = 50_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.array(english_words(), dtype=object)
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf-like word frequencies, common words first
    weights /= weights.sum()
    tmp = path + ".tmp"
    schema = pa.schema([(name, pa.string()) for name in LENGTHS])
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, pairs, chunk):
            n = min(chunk, pairs - start)
            columns = {}
            for name, median in LENGTHS.items():
                lengths = np.clip(rng.lognormal(np.log(median), 0.6, n).astype(int), 3, 2000)
                words = vocab[rng.choice(len(vocab), size=int(lengths.sum()), p=weights)]
                cuts = np.cumsum(lengths)[:-1]
                columns[name] = [" ".join(piece) for piece in np.split(words, cuts)]
            columns["chosen"] = [" " + text for text in columns["chosen"]]
            columns["rejected"] = [" " + text + " no" for text in columns["rejected"]]  # never identical to chosen
            writer.write_table(pa.table(columns, schema=schema))
    os.replace(tmp, path)


COMMON = ("the of and to a in is that for it as with was on be by this are or his from at which but have an they you "
          "were her she there been one all we their has would when if more no out so said what up its about into than "
          "them can only other new some time could these two may then do first any my now such like our over man me "
          "even most made after also did many before must through back years where much your way well down should "
          "because each just those people how too little state good very make world still own see men work long get "
          "here between both life being under never day same another know while last might us great old year off come "
          "since against go came right used take three").split()


def english_words() -> list[str]:
    """Common English words, then VADER's lexicon words (installed with the built-in sentiment set) as the tail."""
    words = list(COMMON)
    try:
        import vaderSentiment

        with open(os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt"), encoding="utf-8") as f:
            words += [w for w in (line.split("\t")[0] for line in f) if w.isalpha() and w not in COMMON]
    except (ImportError, OSError):
        pass
    return words


def tokenizer_for(words_file: str):
    from dpo_dist.model.builtin import cache_root

    folder = os.path.join(cache_root(), "models", "SmolLM2-135M-Instruct")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(folder), "SmolLM2-135M-Instruct (built-in)"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    import pyarrow.parquet as pq

    sample = pq.ParquetFile(words_file).read_row_group(0).column("chosen").to_pylist()[:2000]
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>"), "byte-level BPE, 4096 (trained here)"


def child(args: argparse.Namespace) -> None:
    """One run of the pipeline, in a fresh process; prints one JSON line."""
    from dpo_dist.data.load import auto_num_proc, load_pairs
    from dpo_dist.data.tokenization import Truncation, tokenize_pairs

    tokenizer, name = tokenizer_for(args.parquet)
    start = time.perf_counter()
    pairs, report = load_pairs(args.parquet, num_proc=args.num_proc)
    loaded = time.perf_counter()
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, Truncation(args.max_length, args.max_prompt_length),
                                        num_proc=auto_num_proc(args.num_proc, len(pairs)))
    done = time.perf_counter()
    tokens = sum(sum(len(ids) for ids in batch[c]) for batch in tokenized.iter(batch_size=100_000)
                 for c in ("prompt_input_ids", "chosen_input_ids")) if args.count_tokens else None
    print(json.dumps({"load_validate_s": loaded - start, "tokenize_s": done - loaded, "pairs": len(tokenized),
                      "report": report.summary(), "dropped": dropped, "tokenizer": name,
                      "prompt_chosen_tokens": tokens}), flush=True)


def anonymous_rss(pid: int) -> int:
    """Resident anonymous memory of a process in bytes (``RssAnon``: heap, not file-backed mmapped pages)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(args: argparse.Namespace, cache: str) -> dict:
    import psutil

    env = dict(os.environ, HF_DATASETS_CACHE=cache, TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, os.path.abspath(__file__), "--child", "--parquet", args.parquet,
               "--num-proc", str(args.num_proc), "--max-length", str(args.max_length),
               "--max-prompt-length", str(args.max_prompt_length)]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peaks = {"rss_sum": 0, "anon_sum": 0, "anon_max": 0}

    def sample() -> None:
        try:
            root = psutil.Process(process.pid)
            while process.poll() is None:
                rss = anon = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                        a = anonymous_rss(p.pid)
                    except (psutil.Error, OSError):
                        continue
                    anon += a
                    peaks["anon_max"] = max(peaks["anon_max"], a)
                peaks["rss_sum"] = max(peaks["rss_sum"], rss)
                peaks["anon_sum"] = max(peaks["anon_sum"], anon)
                time.sleep(0.2)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"the pipeline failed (exit {process.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_s=wall, peak_rss_gib=usage.ru_maxrss / 2**20, peak_rss_sum_gib=peaks["rss_sum"] / 2**30,
                  peak_anon_gib=peaks["anon_max"] / 2**30, peak_anon_sum_gib=peaks["anon_sum"] / 2**30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--dir", default=os.path.join(os.path.expanduser("~"), ".cache", "dpo_dist", "data_scale"),
                        help="where the parquet file and the run's datasets cache go")
    parser.add_argument("--num-proc", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes for datasets.map (default: this machine's CPUs, at most 8)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-tokens", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parquet", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    os.makedirs(args.dir, exist_ok=True)
    args.parquet = os.path.join(args.dir, f"pairs-{args.pairs}.parquet")
    if not os.path.isfile(args.parquet):
        start = time.perf_counter()
        write_pairs(args.parquet, args.pairs)
        print(f"wrote {args.pairs} pairs to {args.parquet} ({os.path.getsize(args.parquet) / 2**30:.2f} GiB) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    cache = os.path.join(args.dir, f"hf-cache-{args.pairs}")
    shutil.rmtree(cache, ignore_errors=True)  # the first run starts from an empty datasets cache
    runs = {}
    for name in ("first", "second"):
        runs[name] = measure(args, cache)
        r = runs[name]
        print(f"{name:6s}: {r['wall_s']:7.1f} s wall (load+validate {r['load_validate_s']:.1f} s, tokenize "
              f"{r['tokenize_s']:.1f} s), peak RSS {r['peak_rss_gib']:.2f} GiB largest process, "
              f"{r['peak_rss_sum_gib']:.2f} GiB all processes; anonymous (heap) peak {r['peak_anon_gib']:.2f} GiB "
              f"largest process, {r['peak_anon_sum_gib']:.2f} GiB all processes", flush=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
    print(f"{runs['first']['report']}; {runs['first']['pairs']} tokenized ({runs['first']['tokenizer']}, "
          f"num_proc {args.num_proc}); datasets cache {size / 2**30:.2f} GiB")
    print(f"second / first wall time: {runs['second']['wall_s'] / runs['first']['wall_s']:.3f}")
    print(json.dumps({"pairs": args.pairs, "num_proc": args.num_proc, "cpus": os.cpu_count(), "cache_gib": size / 2**30,
                      **{name: {k: v for k, v in r.items() if k != "report"} for name, r in runs.items()}}))


if __name__ == "__main__":
    main()
