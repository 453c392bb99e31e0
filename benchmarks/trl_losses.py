"""dpo-dist's losses against TRL 1.16's DPOTrainer loss, on the same log-probs, in one invocation.

    python benchmarks/trl_losses.py                # 64 pairs, beta 0.1 and 0.5, every option both accept
    python benchmarks/trl_losses.py --pairs 256 --json FILE

TRL's loss is its own code: ``DPOTrainer._compute_loss`` called on a stand-in model whose output holds the per-token
log-probs we choose (TRL 1.16 reads ``outputs.log_probs`` from its fused LM head), with precomputed reference
log-probs, so both see the same numbers. dpo-dist's is ``preference_loss`` on the sums of those log-probs, as
``dpo_dist.train.objective`` passes them (LD-DPO's shared and tail parts, WPO's aligned sums). Per-pair losses and
rewards come from one pair at a time (TRL returns a batch's mean); ``aot``, ``aot_unpaired`` and ``sft``, which
depend on the batch, are compared per micro-batch of 8 pairs. TRL runs in its own environment
(``benchmarks/.trl-venv``, as ``benchmarks/vs_trl.py`` makes it), never in the project's.

Prints one line per loss type and option set: the largest absolute difference of losses and of rewards, and whether
docs/losses.md's table says they differ (``sigmoid`` with label smoothing is cDPO here; TRL ignores the option).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import subprocess
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

TRL_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
BATCH_DEPENDENT = {"aot", "aot_unpaired", "sft"}
MIXTURES = ((("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)), (("sigmoid", "sft"), (1.0, 1.0)),
            (("hinge", "ipo", "sigmoid_norm"), (0.5, 1.0, 2.0)))
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def sixty_fourths(x):
    """Rounded to multiples of 1/64, so that every sum of up to 40 of them is exact in fp32: both trainers then see the
    same summed log-probs whatever order they add them in, and what differs is the loss itself."""
    return (x * 64).round() / 64


def make_pairs(count: int, seed: int):
    """Per-token log-probs of each side (policy; reference sums nearby), lengths 1 to 40, and WPO's log sum p^2."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        n_c, n_r = (int(torch.randint(1, 41, (1,), generator=g)) for _ in range(2))
        side = {}
        for name, n in (("chosen", n_c), ("rejected", n_r)):
            tokens = sixty_fourths(-3.0 * torch.rand(n, generator=g, dtype=torch.float32))
            shift = sixty_fourths(2.0 * torch.randn(1, generator=g)).item()
            side[name] = dict(tokens=tokens, ref=float(tokens.sum()) + shift,
                              log_sum_sq=-2.0 * torch.rand(n, generator=g, dtype=torch.float32))
        pairs.append(side)
    return pairs


def options_grid():
    """(loss types, weights, options) for every combination both trainers accept."""
    from dpo_dist.loss_types import LOSSES

    for beta in (0.1, 0.5):
        for types_, weights in [((t,), (1.0,)) for t in TRL_TYPES] + list(MIXTURES):
            records = [LOSSES[t] for t in types_]
            smoothing = {"robust": (0.0, 0.1), "exo_pair": (0.001, 0.1), "aot": (0.0, 0.1), "aot_unpaired": (0.0, 0.1),
                         "sigmoid": (0.0, 0.1)}.get(types_[0], (0.0,)) if len(types_) == 1 else (0.0,)
            applies = all(r.f_divergence != "undefined" for r in records) and any(
                r.f_divergence == "applies" for r in records)
            for e, f in itertools.product(smoothing, F_DIVERGENCES if applies else F_DIVERGENCES[:1]):
                alphas = (0.5, 0.3) if f == "alpha_divergence" else (0.5,)
                for alpha in alphas:
                    yield types_, weights, dict(beta=beta, label_smoothing=e, f_divergence_type=f,
                                                f_alpha_divergence_coef=alpha, ld_alpha=None, use_weighting=False)
            yield types_, weights, dict(beta=beta, label_smoothing=smoothing[0], f_divergence_type="reverse_kl",
                                        f_alpha_divergence_coef=0.5, ld_alpha=0.5, use_weighting=False)
            if not any(r.sorts_batch for r in records):
                yield types_, weights, dict(beta=beta, label_smoothing=smoothing[0], f_divergence_type="reverse_kl",
                                            f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=True)


def trl_batch(pairs, types_, weights, o):
    """TRL's batch loss and mean rewards for a batch of pairs, through DPOTrainer._compute_loss."""
    import torch
    from trl import DPOTrainer

    length = 1 + max(len(p[s]["tokens"]) for p in pairs for s in ("chosen", "rejected"))  # one prompt token first
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    log_probs = torch.zeros(len(rows), length - 1, dtype=torch.float32)
    log_sum_sq = torch.zeros_like(log_probs)
    completion_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["tokens"])
        log_probs[i, :n] = row["tokens"]
        log_sum_sq[i, :n] = row["log_sum_sq"]
        completion_mask[i, 1:n + 1] = 1
    outputs = types.SimpleNamespace(log_probs=log_probs, log_sum_sq_probs=log_sum_sq,
                                    entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs),
                                    is_top1=torch.zeros_like(log_probs, dtype=torch.bool))
    inputs = dict(input_ids=torch.ones(len(rows), length, dtype=torch.long), attention_mask=torch.ones_like(
        completion_mask), completion_mask=completion_mask,
                  ref_chosen_logps=torch.tensor([p["chosen"]["ref_ld" if o["ld_alpha"] is not None else "ref"]
                                                 for p in pairs], dtype=torch.float32),
                  ref_rejected_logps=torch.tensor([p["rejected"]["ref_ld" if o["ld_alpha"] is not None else "ref"]
                                                   for p in pairs], dtype=torch.float32))
    identity = lambda x: x  # noqa: E731 (one process: a gather is the tensor itself)
    metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=o["ld_alpha"], precompute_ref_logps=True,
        f_divergence_type=o["f_divergence_type"], f_alpha_divergence_coef=o["f_alpha_divergence_coef"],
        loss_types=list(types_), loss_weights=list(weights), beta=o["beta"], label_smoothing=o["label_smoothing"],
        args=types.SimpleNamespace(discopop_tau=0.05), use_weighting=o["use_weighting"], _metrics=metrics,
        _total_train_tokens=0, _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return float(loss), metrics["train"]["rewards/chosen"][-1], metrics["train"]["rewards/rejected"][-1]


def ours_batch(pairs, types_, weights, o):
    """dpo-dist's per-pair losses and rewards for a batch of pairs, as the objective passes them."""
    import torch
    from dpo_dist.train.loss import length_desensitized_logps, preference_loss, wpo_weights

    def side(name, key):
        return torch.tensor([key(p[name], p) for p in pairs], dtype=torch.float32)

    def shared(row, pair):  # the first min(n_c, n_r) tokens
        n = min(len(pair["chosen"]["tokens"]), len(pair["rejected"]["tokens"]))
        return float(row["tokens"][:n].sum())

    policy = {s: side(s, lambda row, pair: float(row["tokens"].sum())) for s in ("chosen", "rejected")}
    tokens = {s: side(s, lambda row, pair: len(row["tokens"])).long() for s in ("chosen", "rejected")}
    scored = dict(policy)
    ref_key = "ref"
    if o["ld_alpha"] is not None:
        scored = {s: length_desensitized_logps(side(s, shared), policy[s], o["ld_alpha"]) for s in policy}
        ref_key = "ref_ld"
    weights_ = None
    if o["use_weighting"]:
        aligned = {s: side(s, lambda row, pair: float((row["tokens"] - row["log_sum_sq"]).sum())) for s in policy}
        weights_ = wpo_weights(aligned["chosen"], tokens["chosen"], aligned["rejected"], tokens["rejected"])
    return preference_loss(
        scored["chosen"], scored["rejected"], side("chosen", lambda row, pair: row[ref_key]),
        side("rejected", lambda row, pair: row[ref_key]), beta=o["beta"], loss_type=types_, loss_weights=weights,
        label_smoothing=o["label_smoothing"], f_divergence_type=o["f_divergence_type"],
        f_alpha_divergence_coef=o["f_alpha_divergence_coef"], chosen_tokens=tokens["chosen"],
        rejected_tokens=tokens["rejected"], pair_weights=weights_, sft_chosen_logps=policy["chosen"],
    )


def add_ld_references(pairs, ld_alpha: float) -> None:
    """LD-DPO's reference log-prob: the reference's shared part taken in proportion to the policy's (the two are
    compared on the same sums; only the weighting has to agree)."""
    for pair in pairs:
        n = min(len(pair["chosen"]["tokens"]), len(pair["rejected"]["tokens"]))
        for name in ("chosen", "rejected"):
            row = pair[name]
            fraction = n / len(row["tokens"])
            row["ref_ld"] = round(64 * (row["ref"] * fraction + ld_alpha * row["ref"] * (1 - fraction))) / 64


def expected_to_differ(types_, o) -> str | None:
    """What docs/losses.md says differs from TRL 1.16, or None."""
    if "sigmoid" in types_ and o["label_smoothing"] > 0:
        return "cDPO (TRL ignores label_smoothing for sigmoid)"
    return None


def relative(theirs: float, ours: float) -> float:
    """|theirs - ours| / max(1, |theirs|): absolute below 1, relative above (fp32 keeps about 7 digits)."""
    return abs(theirs - ours) / max(1.0, abs(theirs))


def differences(pairs, types_, weights, o) -> tuple[float, float]:
    """The largest differences of losses and of rewards over the pairs (per micro-batch where the batch matters)."""
    loss_diff = reward_diff = 0.0
    if set(types_) & BATCH_DEPENDENT:
        for start in range(0, len(pairs), 8):
            batch = pairs[start:start + 8]
            trl_loss, trl_chosen, trl_rejected = trl_batch(batch, types_, weights, o)
            losses, chosen, rejected = ours_batch(batch, types_, weights, o)
            loss_diff = max(loss_diff, relative(trl_loss, float(losses.mean())))
            reward_diff = max(reward_diff, relative(trl_chosen, float(chosen.mean())),
                              relative(trl_rejected, float(rejected.mean())))
    else:
        for pair in pairs:
            trl_loss, trl_chosen, trl_rejected = trl_batch([pair], types_, weights, o)
            losses, chosen, rejected = ours_batch([pair], types_, weights, o)
            loss_diff = max(loss_diff, relative(trl_loss, float(losses[0])))
            reward_diff = max(reward_diff, relative(trl_chosen, float(chosen[0])),
                              relative(trl_rejected, float(rejected[0])))
    return loss_diff, reward_diff


def compare(pair_count: int, seed: int) -> list[dict]:
    pairs = make_pairs(pair_count, seed)
    add_ld_references(pairs, 0.5)
    results = []
    for types_, weights, o in options_grid():
        try:
            loss_diff, reward_diff = differences(pairs, types_, weights, o)
        except RuntimeError as error:  # TRL's sft with WPO multiplies an expanded tensor in place
            results.append(dict(loss_type=list(types_), loss_weights=list(weights), **o, trl_error=str(error)[:120]))
            continue
        results.append(dict(loss_type=list(types_), loss_weights=list(weights), **o, max_loss_diff=loss_diff,
                            max_reward_diff=reward_diff, documented_difference=expected_to_differ(types_, o)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every comparison here")
    parser.add_argument("--trl_venv", default=os.path.join(HERE, ".trl-venv"))
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest difference counted as equal, "
                        "absolute below 1 and relative above (fp32, as TRL's alpha-divergence takes no fp64)")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        from vs_trl import trl_python

        python = trl_python(args.trl_venv)
        sys.exit(subprocess.run([python, os.path.abspath(__file__), *sys.argv[1:]]).returncode)
    results = compare(args.pairs, args.seed)
    print(f"trl {trl.__version__}; {args.pairs} pairs (lengths 1 to 40), seed {args.seed}; fp32; "
          f"per pair (aot, aot_unpaired, sft: per micro-batch of 8); differences absolute below 1, relative above")
    unexpected = 0
    for r in results:
        name = "+".join(r["loss_type"]) + (f" {r['loss_weights']}" if len(r["loss_type"]) > 1 else "")
        if "trl_error" in r:
            print(f"{name:32s} ld_alpha={r['ld_alpha']} wpo={r['use_weighting']}: TRL raises {r['trl_error']}")
            continue
        equal = r["max_loss_diff"] <= args.tolerance and r["max_reward_diff"] <= args.tolerance
        note = "equal" if equal else ("differs as documented: " + r["documented_difference"]
                                      if r["documented_difference"] else "DIFFERS")
        unexpected += (not equal and not r["documented_difference"]) + (equal and bool(r["documented_difference"]))
        options = (f"beta={r['beta']} e={r['label_smoothing']} f={r['f_divergence_type']}"
                   + (f"({r['f_alpha_divergence_coef']})" if r["f_divergence_type"] == "alpha_divergence" else "")
                   + (f" ld_alpha={r['ld_alpha']}" if r["ld_alpha"] is not None else "")
                   + (" wpo" if r["use_weighting"] else ""))
        print(f"{name:32s} {options:58s} loss {r['max_loss_diff']:.1e} rewards {r['max_reward_diff']:.1e}  {note}")
    print(f"{len(results)} comparisons, {unexpected} not as docs/losses.md says")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(trl=trl.__version__, pairs=args.pairs, seed=args.seed, results=results), f, indent=1)
    sys.exit(1 if unexpected else 0)


if __name__ == "__main__":
    main()
