"""launch/chat.py driven as a terminal program (a pseudo-terminal), against answers computed here with plain
transformers calls on the same model."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch

from tiny import make_llama, make_tokenizer
from training import ROOT

CHAT = os.path.join(ROOT, "launch", "chat.py")
MAX_NEW = 10


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A ChatML base and a LoRA adapter on it with random (non-zero) weights, saved as a run saves its model/."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("chat")
    tokenizer = make_tokenizer("chatml")
    base = make_llama(len(tokenizer), seed=2)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    return root


def expected_answer(root, conversation):
    """Greedy answer of base + adapter to ``conversation`` (a list of user/assistant messages)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter").eval()
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_NEW, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class Terminal:
    """A program on a pseudo-terminal: what a user at a keyboard would see and type."""

    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, marker, timeout=120):
        deadline = time.time() + timeout
        while marker not in self.seen:
            assert self.process.poll() is None or select.select([self.master], [], [], 0)[0], self.seen
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            assert ready, f"no {marker!r} within {timeout}s; saw:\n{self.seen}"
            self.seen += os.read(self.master, 4096).decode(errors="replace").replace("\r\n", "\n")
        before, _, self.seen = self.seen.partition(marker)
        return before

    def type(self, text):
        os.write(self.master, text.encode())

    def close(self):
        os.close(self.master)
        if self.process.poll() is None:
            self.process.kill()


@pytest.mark.slow
def test_interactive_chat_streams_answers_keeps_history_and_resets(adapter_dir):
    first, second = "hello there", "and the bread?"
    answer1 = expected_answer(adapter_dir, [{"role": "user", "content": first}])
    answer2 = expected_answer(adapter_dir, [{"role": "user", "content": first}, {"role": "assistant", "content": answer1},
                                            {"role": "user", "content": second}])
    fresh2 = expected_answer(adapter_dir, [{"role": "user", "content": second}])
    assert answer1.strip() and answer2 != fresh2, "the example must show whether history is used"

    term = Terminal([sys.executable, CHAT, str(adapter_dir / "adapter"), "--base", str(adapter_dir / "base"),
                     "--greedy", "--max_new_tokens", str(MAX_NEW)])
    try:
        banner = term.read_until("you> ")
        assert "adapter" in banner and "chat template" in banner
        term.type(first + "\n")
        assert term.read_until("you> ").split("assistant> ", 1)[1].rstrip("\n") == answer1
        term.type(second + "\n")
        assert term.read_until("you> ").split("assistant> ", 1)[1].rstrip("\n") == answer2  # with the history
        term.type("/reset\n")
        assert "conversation cleared" in term.read_until("you> ")
        term.type(second + "\n")
        assert term.read_until("you> ").split("assistant> ", 1)[1].rstrip("\n") == fresh2  # history forgotten
        term.type("\x04")  # Ctrl-D
        assert term.process.wait(timeout=30) == 0
    finally:
        term.close()


@pytest.mark.slow
def test_one_prompt_answers_and_exits(adapter_dir):
    done = subprocess.run([sys.executable, CHAT, str(adapter_dir / "adapter"), "--base", str(adapter_dir / "base"),
                           "--greedy", "--max_new_tokens", str(MAX_NEW), "--prompt", "hello there"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == expected_answer(adapter_dir, [{"role": "user", "content": "hello there"}])


@pytest.mark.slow
def test_sampling_options_are_seeded_and_bad_folders_are_named(adapter_dir, tmp_path):
    argv = [sys.executable, CHAT, str(adapter_dir / "adapter"), "--base", str(adapter_dir / "base"), "--prompt", "hi",
            "--temperature", "1.5", "--top_k", "20", "--max_new_tokens", "12", "--seed", "7"]
    runs = [subprocess.run(argv, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout
    done = subprocess.run([sys.executable, CHAT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and re.search("no model here", done.stderr)


def test_answers_stream_in_pieces_and_old_exchanges_make_room(adapter_dir):
    from transformers import AutoTokenizer

    from dpo_dist.eval.chat import Chat, ChatSampling
    from dpo_dist.model.trained import load_trained

    trained = load_trained(str(adapter_dir / "adapter"), device=torch.device("cpu"), base=str(adapter_dir / "base"))
    chat = Chat(trained.model, trained.tokenizer, torch.device("cpu"), sampling=ChatSampling(max_new_tokens=MAX_NEW, greedy=True))
    pieces = []

    class Recorder:
        def put(self, value):
            pieces.append(value.tolist())

        def end(self):
            pieces.append("end")

    answer = chat.reply("hello there", streamer=Recorder())
    assert len(pieces) > 2 and pieces[-1] == "end", "tokens reach the streamer one step at a time"
    assert answer == expected_answer(adapter_dir, [{"role": "user", "content": "hello there"}])

    # The tiny model has 256 positions: keep all but what the last exchange and the new message need for the answer.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir / "adapter")
    recent = [{"role": "user", "content": "bread"}, {"role": "assistant", "content": "flour"}]
    fits = len(tokenizer(tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, *recent, {"role": "user", "content": "thanks"}],
        tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    chat = Chat(trained.model, tokenizer, torch.device("cpu"), sampling=ChatSampling(max_new_tokens=256 - fits),
                system="be brief")
    chat.messages = [{"role": "user", "content": "the movie was great " * 3}, {"role": "assistant", "content": "yes"},
                     *recent]
    ids, dropped = chat.prompt_ids("thanks")
    assert dropped == 1 and len(ids) == fits
    assert chat.messages == recent
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nbe brief"), "the system message stays"
