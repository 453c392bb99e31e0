"""The package's layout follows the data flow: data -> model -> train -> eval -> rounds -> publish, and no module
imports from a later stage. ``rounds`` (iterative DPO) drives training and judges with evaluation's judges.

``config``, ``loss_types`` (the loss types' records, which the config checks), ``distributed`` and ``progress`` (what
a long stage shows, used from the data stage on) sit at the top: every stage may use them, and they import no stage. So does ``attention_cost``, the cost model of the attention kernels: the
data stage lays out packed rows by it, and may not import the model stage whose kernels it models. ``launch_policy`` (the
single-device fallback) rewrites the process's environment and exits ranks before any stage runs: launch policy, not a
stage's work. ``publish`` comes last because it reports on every other stage: the model
card shows training's metrics and evaluation's results, read through those stages' own readers (no stage reads another
one's files behind this test's back), and the folders it writes (a merged model, a checkpoint's export) carry that card.
The trainer therefore does not write the card: ``launch/train.py`` does, once training has ended.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from dpo_dist.config import SENTIMENT_PROMPTS

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dpo_dist"
STAGES = {"config": 0, "distributed": 0, "loss_types": 0, "attention_cost": 0, "launch_policy": 0, "progress": 0,
          "data": 1, "model": 2, "train": 3, "eval": 4, "rounds": 5, "publish": 6}
FOLDERS = ("data", "model", "train", "eval", "rounds", "publish")
TOP_LEVEL = {"__init__.py", "config.py", "distributed.py", "loss_types.py", "attention_cost.py", "launch_policy.py",
             "progress.py", *FOLDERS, "__pycache__"}
LOOP = {"to_device", "evaluate", "train_step", "Run", "setup", "train", "loop", "finish"}


def stage_of(module: str) -> int:
    """``dpo_dist.train.loss`` -> 3; ``dpo_dist`` itself -> 0."""
    parts = module.split(".")
    return STAGES[parts[1]] if len(parts) > 1 else 0


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every dpo_dist import in ``source``, at module level or inside functions.

    ``from dpo_dist.train import reference_cache`` names the module ``dpo_dist.train.reference_cache``.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dpo_dist"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "dpo_dist":
            if node.module.count(".") == 0 or node.module in {f"dpo_dist.{folder}" for folder in FOLDERS}:
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module}: line {node.lineno}: relative import; write dpo_dist.<stage>.<module>")
    return found


def backward_arrows(source: str, module: str) -> list[str]:
    """Each import in ``source`` (the text of ``module``) that points to a later stage, as one readable line."""
    return [f"{module} (stage {stage_of(module)}) line {line} imports {target} (stage {stage_of(target)})"
            for line, target in imported_modules(source, module) if stage_of(target) > stage_of(module)]


def package_modules() -> list[tuple[str, pathlib.Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((".".join(p for p in parts if p != "__init__"), path))
    return out


def test_no_module_imports_from_a_later_stage():
    arrows = [a for module, path in package_modules() for a in backward_arrows(path.read_text(encoding="utf-8"), module)]
    assert not arrows, "imports against the data flow:\n" + "\n".join(arrows)


def test_the_import_check_catches_an_arrow_back():
    """A data module importing the trainer (even inside a function), or config importing a stage, is reported."""
    source = "def f():\n    from dpo_dist.train.trainer import train\n"
    assert backward_arrows(source, "dpo_dist.data.collate") == [
        "dpo_dist.data.collate (stage 1) line 2 imports dpo_dist.train.trainer (stage 3)"]
    assert backward_arrows("from dpo_dist.data import sentiment\n", "dpo_dist.config")
    assert backward_arrows("import dpo_dist.eval.report\n", "dpo_dist.train.metrics")
    assert not backward_arrows("from dpo_dist.config import Config\nfrom dpo_dist.data.collate import IGNORE_INDEX\n",
                               "dpo_dist.train.logprobs")
    with pytest.raises(AssertionError, match="relative import"):
        imported_modules("from .collate import IGNORE_INDEX\n", "dpo_dist.data.packing")


def test_every_module_sits_in_a_stage():
    """Only the cross-cutting modules live at the top; everything else is in a stage's folder."""
    assert {p.name for p in PACKAGE.iterdir()} <= TOP_LEVEL, sorted({p.name for p in PACKAGE.iterdir()} - TOP_LEVEL)
    for stage in FOLDERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text(encoding="utf-8")))
        assert doc and doc.startswith(f"Stage {STAGES[stage]}, "), f"dpo_dist/{stage}/__init__.py says what the stage does"


def test_trainer_holds_only_the_loop():
    tree = ast.parse((PACKAGE / "train" / "trainer.py").read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defined == LOOP, f"trainer.py should hold the loop only; move {sorted(defined - LOOP)} to their stage"


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in a module -> imported-modules graph, as a path that ends where it starts; None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target in graph and not state.get(target):
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if not state.get(start):
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycles_at_module_level():
    graph = {}
    for module, path in package_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        graph[module] = {t for _, t in imported_modules(ast.unparse(top), module) if t != module}
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_config_counts_the_builtin_prompts():
    """The config validates data.sentiment.num_prompts against a count that the data stage owns the text of."""
    from dpo_dist.data.sentiment import prompts

    assert len(prompts()) == SENTIMENT_PROMPTS


def defined_at_top(module_path: pathlib.Path) -> set[str]:
    tree = ast.parse(module_path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


# Each job's functions, in the one module that does that job (defined there and nowhere else in the package).
HOMES = {
    # train/: checkpoints (atomic save/load/prune, the LoRA hooks); the best metric; the end of a run
    "save_checkpoint": "dpo_dist.train.checkpoint", "load_checkpoint": "dpo_dist.train.checkpoint",
    "adapter_only_checkpoints": "dpo_dist.train.checkpoint",
    "track_best": "dpo_dist.train.best", "stopped_early": "dpo_dist.train.best",
    "final_weights": "dpo_dist.train.final", "save_final_model": "dpo_dist.train.final",
    "save_checkpoint_model": "dpo_dist.train.final",
    # model/: a run's model loaded back, an adapter merged into its base
    "load_trained": "dpo_dist.model.trained", "merged_model": "dpo_dist.model.merge",
    "generation_config": "dpo_dist.model.generation", "generate_responses": "dpo_dist.model.generation",
    "sample_responses": "dpo_dist.model.generation", "Sampling": "dpo_dist.model.generation",
    "prompt_batches": "dpo_dist.model.generation", "sample_batch": "dpo_dist.model.generation",
    "sample_round": "dpo_dist.rounds.sampling",
    "response_logps": "dpo_dist.eval.scoring",
    "packed_mask": "dpo_dist.model.attention", "packed_mask_mod": "dpo_dist.model.attention",
    "plan_rows": "dpo_dist.data.packing", "choose_rows": "dpo_dist.data.packing",
    "dense_cost": "dpo_dist.attention_cost", "segmented_pays": "dpo_dist.attention_cost",
    # groups: what a group example is and what its batch carries (both collators), how its spans split, its scores
    "responses_of": "dpo_dist.data.collate", "group_columns": "dpo_dist.data.collate",
    "span_sizes": "dpo_dist.model.segmented_attention", "group_logps": "dpo_dist.train.logprobs",
    # publish/: the card, and every folder that leaves with one
    "write_card": "dpo_dist.publish.card", "write_run_card": "dpo_dist.publish.card", "render": "dpo_dist.publish.card",
    "export_checkpoint": "dpo_dist.publish.export", "merge_adapter": "dpo_dist.publish.export",
    "push_to_hub": "dpo_dist.publish.export",
}


def test_each_job_has_one_home():
    defined: dict[str, list[str]] = {}
    for module, path in package_modules():
        for name in defined_at_top(path):
            defined.setdefault(name, []).append(module)
    misplaced = {name: defined.get(name) for name, home in HOMES.items() if defined.get(name) != [home]}
    assert not misplaced, f"expected each in its one home {[HOMES[n] for n in misplaced]}; found {misplaced}"


PUBLISHING = {"HfApi", "ModelCard", "ModelCardData", "upload_folder", "create_repo"}  # huggingface_hub's


def test_only_publish_writes_cards_or_talks_to_the_hub():
    """The card and the upload are publishing: no module before ``publish/`` names huggingface_hub's card or upload
    API (reading from the Hub, as model loading does, is not publishing)."""
    found = []
    for module, path in package_modules():
        if stage_of(module) == STAGES["publish"]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else [name]
            found += [f"{module} line {node.lineno}: {n}" for n in names if n in PUBLISHING]
    assert not found, "publishing outside dpo_dist/publish/:\n" + "\n".join(found)


# Files one stage writes and another reads, each named in one module: its writer's (or config's, where a stage before
# the writer needs the name too); every reader goes through that module.
SHARED_FILES = {"metrics.jsonl": "dpo_dist.train.metrics", "run.json": "dpo_dist.train.metrics",
                "results.json": "dpo_dist.eval.report", "trainer_state.json": "dpo_dist.config"}


def test_files_read_across_stages_are_named_once():
    named: dict[str, set[str]] = {}
    for module, path in package_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in SHARED_FILES:
                named.setdefault(node.value, set()).add(module)
    wrong = {name: sorted(named.get(name, ())) for name, owner in SHARED_FILES.items() if named.get(name) != {owner}}
    assert not wrong, f"each file named only by its owner {SHARED_FILES}; found {wrong}"


# data/sentiment.py samples the built-in set's completions itself: it is stage 1, before the model stage, and what it
# samples is cached under a fingerprint that a change of its sampling would have to bump.
GENERATES_OUTSIDE = {"dpo_dist.data.sentiment"}


def test_generation_is_in_one_module():
    """``model.generate`` is called, and a ``GenerationConfig`` built, in ``dpo_dist.model.generation`` only: training's
    samples, evaluation, chat (and any later sampling from a policy) go through it."""
    found = []
    for module, path in package_modules():
        if module == "dpo_dist.model.generation":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate" \
                    and module not in GENERATES_OUTSIDE:
                found.append(f"{module} line {node.lineno}: .generate(...)")
            if isinstance(node, (ast.Name, ast.Attribute)) and (getattr(node, "id", None) or getattr(node, "attr", None)) \
                    == "GenerationConfig":
                found.append(f"{module} line {node.lineno}: GenerationConfig")
            if isinstance(node, ast.ImportFrom) and any(a.name == "GenerationConfig" for a in node.names):
                found.append(f"{module} line {node.lineno}: imports GenerationConfig")
    assert not found, "generation outside dpo_dist/model/generation.py:\n" + "\n".join(found)


def environment_writes_and_exits(source: str) -> list[str]:
    """Each place ``source`` changes the process's environment (``os.environ[...] =``, ``del``, ``.pop``/``.update``/
    ``.setdefault``/``.clear``, ``os.putenv``) or ends the process (``sys.exit``, ``os._exit``): launch policy."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else []
        for target in targets:
            if isinstance(target, ast.Subscript) and ast.unparse(target.value) == "os.environ":
                found.append(f"line {node.lineno}: {ast.unparse(target)} changed")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = ast.unparse(node.func)
            if name in ("os.environ.pop", "os.environ.update", "os.environ.setdefault", "os.environ.clear",
                        "os.putenv", "sys.exit", "os._exit"):
                found.append(f"line {node.lineno}: {name}(...)")
    return found


def test_model_has_no_launch_policy():
    """No model module rewrites the environment or ends the process, and no stage module rewrites the environment:
    that is the launch's (``launch_policy``, ``launch/``). The trainer's stop on a stuck signal (``os._exit`` in
    ``train/preemption.py``) is the one exit a stage makes."""
    found = []
    for module, path in package_modules():
        if stage_of(module) == 0:
            continue
        for place in environment_writes_and_exits(path.read_text(encoding="utf-8")):
            if module.startswith("dpo_dist.model.") or "os.environ" in place or "putenv" in place:
                found.append(f"{module} {place}")
    assert not found, "launch policy in a stage:\n" + "\n".join(found)
    assert environment_writes_and_exits((PACKAGE / "launch_policy.py").read_text(encoding="utf-8")), \
        "the check finds launch_policy's own environment writes"


def test_an_accelerator_is_built_in_one_place():
    """``distributed.build_accelerator`` builds the run's one Accelerator; evaluation, chat and publishing run in one
    process and load what they need without one (the data stage loads a config's pairs in any process)."""
    found = [f"{module} line {node.lineno}" for module, path in package_modules() if module != "dpo_dist.distributed"
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Accelerator"]
    assert not found, "an Accelerator built outside distributed.py:\n" + "\n".join(found)
