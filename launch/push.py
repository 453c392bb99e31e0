"""Upload a trained adapter or a merged model to the Hugging Face Hub (needs the network and `hf auth login`,
`huggingface-cli login` or HF_TOKEN).

    python launch/push.py outputs/default my-name/smollm2-dpo-sentiment-lora        # the run's adapter (model/)
    python launch/push.py outputs/default/merged my-name/smollm2-dpo-sentiment --private
    python launch/push.py outputs/default/merged my-name/smollm2-dpo-sentiment --revision beta-0.1 \\
        --commit_message "beta 0.1, 2 epochs"
    python launch/push.py outputs/default/checkpoint-200 my-name/smollm2-dpo-sentiment-lora --revision step-200

A checkpoint's weights are first exported to <checkpoint>/model (the adapter or the full model, the tokenizer, and a
card that says which step), as the run's model/ would hold them had training stopped there; a sharded run's
checkpoint is consolidated into that one model folder in this process: FSDP2's shards (torch.distributed.checkpoint)
read whole, DeepSpeed's put together by its zero_to_fp32 (the fp32 master weights). launch/merge.py merges the
adapter of <checkpoint>/model once exported.

The folder's README.md (the model card train.py and merge.py write) is uploaded with it; one is written first
when there is none, or when it is one dpo-dist wrote and nobody has edited (then its loading code names REPO_ID).
"""

from __future__ import annotations

import argparse
import sys

import _checkout  # noqa: F401  this checkout's root on the import path, before any dpo_dist import


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a run's output folder (its model/ is pushed), one of its checkpoints, an "
                        "adapter or a model folder")
    parser.add_argument("repo_id", help="owner/name on the Hub; created if missing")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="push to this branch (created from main if missing) instead of main")
    parser.add_argument("--commit_message", default=None, help="default: 'Upload DPO-trained <kind> (dpo-dist)'")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from dpo_dist.publish.export import HubLoginError, export_checkpoint, hub_token, push_to_hub
    from dpo_dist.train.checkpoint import CheckpointError, is_checkpoint

    folder = args.folder
    if is_checkpoint(folder):
        try:
            hub_token()  # first: without one, nothing is exported
            folder = export_checkpoint(folder)
        except (HubLoginError, CheckpointError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"the weights of {args.folder}: {folder}")
    try:
        url = push_to_hub(folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message)
    except HubLoginError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # no model in the folder, no network, no permission: say which, briefly
        print(f"error: could not push {args.folder} to {args.repo_id}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"pushed to {url}" + (f" (branch {args.revision})" if args.revision else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
