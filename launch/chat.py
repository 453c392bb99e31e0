"""Talk to a trained model: a run's LoRA adapter on its base, or a merged / full model.

    python launch/chat.py outputs/default                         # the run's model/ (adapter + its base)
    python launch/chat.py outputs/default/merged --temperature 0.3
    python launch/chat.py outputs/default --prompt "Hello!"       # one answer, then exit
    python launch/chat.py outputs/default --raw                   # no chat template: the model continues your text

Answers stream as they are sampled. Commands: /reset (forget the conversation), /system TEXT (set the system
message and start over), /help, /exit (or Ctrl-D). Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import sys

import _checkout  # noqa: F401  this checkout's root on the import path, before any dpo_dist import

HELP = "/reset forget the conversation · /system TEXT set the system message · /exit quit (or Ctrl-D) · Ctrl-C stops an answer"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run's output folder, its model/ folder, or a merged/full model folder")
    parser.add_argument("--base", default=None, help="the adapter's base (default: the run's model.name_or_path)")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--raw", action="store_true", help="no chat template, no history: continue the text")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default=None, choices=["none", "4bit", "8bit"],
                        help="load the base quantized (default: as the run did)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("--max_new_tokens must be positive, --temperature > 0, --top_p in (0, 1], --top_k >= 0")
    return args


def load(args: argparse.Namespace, whole_process: bool = False):
    """The model and a chat with it. ``whole_process`` (``python launch/chat.py``): bitsandbytes is kept out of the
    process unless the base is quantized, DeepSpeed always (:func:`dpo_dist.distributed.load_only_what_is_used`)."""
    import os

    from dpo_dist.distributed import filter_warnings, load_only_what_is_used
    from dpo_dist.model.trained import run_config

    if whole_process:  # before peft is imported
        cfg = run_config(args.model) if os.path.isdir(args.model) else None
        quantization = args.quantization or (cfg.model.quantization if cfg is not None else "none")
        load_only_what_is_used(bitsandbytes=quantization != "none", deepspeed=False)
    filter_warnings()  # peft's call of a renamed transformers method: not shown
    import torch
    import transformers

    from dpo_dist.eval.chat import Chat, ChatSampling
    from dpo_dist.model.trained import load_trained

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_trained(args.model, device=device, base=args.base, dtype=args.dtype, quantization=args.quantization)
    sampling = ChatSampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.greedy)
    return trained, Chat(trained.model, trained.tokenizer, device, sampling=sampling, system=args.system, raw=args.raw)


def answer(chat, text: str) -> None:
    from transformers import TextStreamer

    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        chat.reply(text, streamer=streamer)
    except KeyboardInterrupt:
        print("\n[stopped]", flush=True)
        return
    if chat.last_dropped:
        print(f"[the {chat.last_dropped} oldest exchanges were dropped to fit the model's context]", flush=True)


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        trained, chat = load(args, whole_process)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.prompt is not None:
        answer(chat, args.prompt)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history with the arrow keys)
    except ImportError:
        pass
    what = f"adapter {trained.folder} on {trained.base_source}" if trained.is_adapter else trained.folder
    mode = "raw text, no history" if chat.raw else "chat template"
    print(f"{what} ({mode}). {HELP}", flush=True)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(HELP)
        elif command == "/reset":
            chat.reset()
            print("[conversation cleared]")
        elif command == "/system":
            chat.system = rest or None
            chat.reset()
            print(f"[system message {'set' if rest else 'removed'}; conversation cleared]")
        elif text.strip():
            print("assistant> ", end="", flush=True)
            answer(chat, text)


if __name__ == "__main__":
    sys.exit(main(whole_process=True))
