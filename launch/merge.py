"""Merge a run's LoRA adapter into its full-precision base and save one ordinary model folder with the tokenizer.

    python launch/merge.py outputs/default                          # -> outputs/default/merged, the base's dtype
    python launch/merge.py outputs/qlora --out merged --dtype float16 --base TinyLlama/TinyLlama-1.1B-Chat-v1.0
    python launch/merge.py outputs/default --push_to_hub my-name/smollm2-dpo [--private] [--revision BRANCH] \\
        [--commit_message "beta 0.1, 2 epochs"]

Also for adapters trained on a 4-bit base (QLoRA): the base is loaded in full precision to merge. The merged folder
loads with ``AutoModelForCausalLM.from_pretrained`` and needs neither peft nor the base; its README.md is the model card.
The weights are saved in the base's own dtype unless --dtype says otherwise (a narrower one rounds away part of what
a short fine-tune changed); the log says which and why.
"""

from __future__ import annotations

import argparse
import os
import sys

import _checkout  # noqa: F401  this checkout's root on the import path, before any dpo_dist import


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run's output folder, or an adapter folder")
    parser.add_argument("--out", default=None, help="where to save (default: <run>/merged)")
    parser.add_argument("--base", default=None, help="the base (default: the run's model.name_or_path)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="the merged weights' dtype (default: the base's own, from its config or weights)")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="then upload the merged folder")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: a private repository")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="with --push_to_hub: push to this branch (created from main if missing) instead of main")
    parser.add_argument("--commit_message", default=None,
                        help="with --push_to_hub (default: 'Upload DPO-trained model (dpo-dist)')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    """Merge as ``argv`` (default ``sys.argv``) says; the exit status. ``whole_process``: this process runs this command
    alone (``python launch/merge.py``): bitsandbytes and DeepSpeed, never used by a merge, are kept out of it."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if (args.private or args.revision or args.commit_message) and not args.push_to_hub:
        print("error: --private, --revision and --commit_message go with --push_to_hub REPO_ID", file=sys.stderr)
        return 2
    import logging

    from dpo_dist.distributed import filter_warnings, load_only_what_is_used

    if whole_process:
        load_only_what_is_used(bitsandbytes=False, deepspeed=False)  # the base is merged in full precision, always
    filter_warnings()
    import transformers

    from dpo_dist.publish.export import merge_adapter, push_to_hub
    from dpo_dist.model.trained import model_folder

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("dpo_dist.model.merge").setLevel(logging.INFO)  # the dtype chosen, and why
    try:
        folder = model_folder(args.run)
        run = os.path.dirname(folder) if os.path.basename(folder) == "model" else folder
        out = args.out or os.path.join(run, "merged")
        merged = merge_adapter(args.run, out, base=args.base, dtype=args.dtype)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"merged {folder} into its base: {out} ({str(merged.dtype).removeprefix('torch.')})")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision,
                              commit_message=args.commit_message)
            print(f"pushed to {url}" + (f" (branch {args.revision})" if args.revision else ""))
        except Exception as error:  # no network, no token, no permission; the merged folder is kept
            print(f"error: could not push {out} to {args.push_to_hub}: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(whole_process=True))
