"""Block discovery: find the stacks of repeated transformer blocks in a Dynamo FX graph.

A *block stack* is a run of sibling submodules of one ``ModuleList`` (``blocks.0``,
``blocks.1``, ...) of the same class, each a container module (it has submodules of
its own, so a ``Sequential`` of bare ``Linear`` layers is not a stack). Discovery uses
only ``node.meta["nn_module_stack"]``: no table of model names.

Assumes:
    * one FX graph as Dynamo (``L['self'].__dict__['_modules']['blocks'].3``) or
      torch.export (``blocks.3``) produces it, ``nn_module_stack`` on every node traced
      inside a module;
    * a block is called once per forward (no weight sharing between calls).

Guarantees (``find_blocks``):
    * every block's compute nodes form one contiguous run in graph order;
    * blocks are listed in graph order; ``Block.index`` is the position in that order,
      across all stacks (Latte's spatial and temporal stacks interleave);
    * ``Block.inputs`` lists every value a block reads from outside it, split into
      ``params`` (lifted parameters and buffers of the block), ``carried`` (values
      that change from block to block: the hidden states) and ``side`` (values every
      block of its stack reads: timestep projection, rotary tables, text states);
    * ``Block.outputs`` lists every block value read after the block.

When these do not hold, ``why_not_cacheable(gm)`` returns the reason as a string and
``find_blocks`` raises ``BlockDiscoveryError`` with it.

The same rule on a module tree (``module_block_stacks``, ``module_blocks``) serves what
works on the eager model: ProfilingDiT's calibration hooks and the peers' cache hooks.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import torch
import torch.fx as fx

from foresight_compile.errors import BlockDiscoveryError
from foresight_compile.passes.inputs import is_module_state

_IGNORED_PATH_TOKENS = frozenset({"__dict__", "_modules"})
# A hook that replaced a module's ``forward`` with a wrapper (diffusers' ``ModelHook``: context
# parallelism, its caches) makes Dynamo reach the module through the bound method:
# ``L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].3``. The owner of
# ``X.forward`` is ``X``, so ``.forward.__self__`` is dropped.
_BOUND_SELF = re.compile(r"\.forward\.__self__(?=[.\[]|$)")
_TOKEN = re.compile(r"[A-Za-z_0-9]+")
# Blocks smaller than this are layers (a Linear, an activation), not transformer blocks.
MIN_BLOCK_NODES = 8


def module_block_stacks(model: torch.nn.Module) -> list[str]:
    """Names of the model's block stacks: ModuleLists of at least two container modules
    (modules with submodules of their own) of one class, the rule ``find_blocks`` applies
    to the traced graph."""
    stacks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 2:
            children = list(m)
            if (len({type(c) for c in children}) == 1
                    and all(any(True for _ in c.children()) for c in children)):
                stacks.append(name)
    return stacks


def module_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(path, block)`` for every block of every stack, stacks in definition order."""
    return [(f"{stack}.{i}", block) for stack in module_block_stacks(model)
            for i, block in enumerate(model.get_submodule(stack))]


def module_path(raw: str) -> str:
    """Normalise a Dynamo or export module path to dotted form: ``blocks.3``."""
    raw = _BOUND_SELF.sub("", raw)
    tokens = _TOKEN.findall(raw)
    if raw.startswith("L[") and len(tokens) >= 2:
        tokens = tokens[2:]  # drop L['self']
    return ".".join(t for t in tokens if t not in _IGNORED_PATH_TOKENS)


@dataclasses.dataclass(frozen=True)
class Block:
    """One repeated block: a contiguous run of graph nodes."""

    index: int
    path: str  # "blocks.3"
    stack: str  # "blocks"
    module_type: str
    nodes: tuple[fx.Node, ...]
    params: tuple[fx.Node, ...]
    carried: tuple[fx.Node, ...]
    side: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]

    @property
    def inputs(self) -> tuple[fx.Node, ...]:
        return self.params + self.carried + self.side

    def __repr__(self) -> str:
        return (f"Block({self.path}, {len(self.nodes)} nodes, carried="
                f"{[n.name for n in self.carried]}, side={[n.name for n in self.side]}, "
                f"outputs={[n.name for n in self.outputs]})")


@dataclasses.dataclass(frozen=True)
class BlockStack:
    """All repeated blocks of one graph, in graph order, with the stack they belong to."""

    blocks: tuple[Block, ...]

    @property
    def stacks(self) -> dict[str, tuple[Block, ...]]:
        out: dict[str, list[Block]] = defaultdict(list)
        for b in self.blocks:
            out[b.stack].append(b)
        return {k: tuple(v) for k, v in out.items()}

    def block_of(self) -> dict[fx.Node, int]:
        return {n: b.index for b in self.blocks for n in b.nodes}

    def __len__(self) -> int:
        return len(self.blocks)


def _block_key(node: fx.Node) -> tuple[str, str, str] | None:
    """(block path, stack path, module type) of the outermost indexed module of a node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for raw, module_type in stack.values():
        path = module_path(raw)
        head, _, last = path.rpartition(".")
        if head and last.isdigit():
            type_name = getattr(module_type, "__qualname__", str(module_type))
            return path, head, type_name
    return None


def _has_submodules(nodes: list[fx.Node], path: str) -> bool:
    prefix = path + "."
    for n in nodes:
        for raw, _ in (n.meta.get("nn_module_stack") or {}).values():
            if module_path(raw).startswith(prefix):
                return True
    return False


def _candidate_runs(gm: fx.GraphModule) -> tuple[dict[str, list[fx.Node]], dict[str, tuple[str, str]], str | None]:
    """Group compute nodes by block path; check each block is one contiguous run.

    A stack whose blocks interleave (WanAnimate's motion-encoder ``res_blocks``) is dropped,
    not fatal: the other stacks of the graph stay candidates. The reason is returned only
    when that leaves no candidate at all."""
    members: dict[str, list[fx.Node]] = defaultdict(list)
    info: dict[str, tuple[str, str]] = {}
    order: list[fx.Node] = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    position = {n: i for i, n in enumerate(order)}
    for n in order:
        key = _block_key(n)
        if key is not None:
            members[key[0]].append(n)
            info[key[0]] = (key[1], key[2])
    dropped: set[str] = set()  # parent (stack) paths
    problem = None
    changed = True
    while changed:
        changed = False
        for path, nodes in members.items():
            if info[path][0] in dropped:
                continue
            first, last = position[nodes[0]], position[nodes[-1]]
            for n in order[first:last + 1]:
                key = _block_key(n)
                if key is not None and key[0] != path and key[1] not in dropped:
                    problem = problem or (f"the nodes of {path} are interleaved with those of "
                                          f"{key[0]}: blocks must run one after the other")
                    dropped.update({info[path][0], key[1]})
                    changed = True
                    break
    kept = {p: ns for p, ns in members.items() if info[p][0] not in dropped}
    if not kept:
        return members, info, problem
    # Absorb unlabelled nodes strictly inside a block's span.
    for path, nodes in kept.items():
        first, last = position[nodes[0]], position[nodes[-1]]
        kept[path] = order[first:last + 1]
    return kept, {p: info[p] for p in kept}, None


def _stacks(members: dict[str, list[fx.Node]], info: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    by_parent: dict[str, list[str]] = defaultdict(list)
    for path in members:
        by_parent[info[path][0]].append(path)
    stacks: dict[str, list[str]] = {}
    for parent, paths in by_parent.items():
        paths.sort(key=lambda p: int(p.rpartition(".")[2]))
        types = {info[p][1] for p in paths}
        if len(paths) < 2 or len(types) != 1:
            continue
        if all(len(members[p]) >= MIN_BLOCK_NODES and _has_submodules(members[p], p) for p in paths):
            stacks[parent] = paths
    return stacks


def why_not_cacheable(gm: fx.GraphModule) -> str | None:
    """The reason no block stack can be cached in ``gm``, or None when one can."""
    try:
        find_blocks(gm)
    except BlockDiscoveryError as e:
        return str(e)
    return None


def find_blocks(gm: fx.GraphModule) -> BlockStack:
    """Find every stack of repeated blocks in ``gm`` (see the module docstring)."""
    members, info, problem = _candidate_runs(gm)
    if problem:
        raise BlockDiscoveryError(problem)
    stacks = _stacks(members, info)
    if not stacks:
        found = sorted({info[p][0] for p in members})
        raise BlockDiscoveryError(
            "no stack of repeated blocks found (a ModuleList of at least 2 submodules of one "
            f"class, each with submodules of its own); indexed modules seen: {found or 'none'}")
    paths = [p for ps in stacks.values() for p in ps]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    paths.sort(key=lambda p: position[members[p][0]])

    node_sets = {p: set(members[p]) for p in paths}
    raw_inputs: dict[str, list[fx.Node]] = {}
    for p in paths:
        seen: dict[fx.Node, None] = {}
        for n in members[p]:
            for a in n.all_input_nodes:
                if a not in node_sets[p]:
                    seen.setdefault(a)
        raw_inputs[p] = list(seen)

    blocks = []
    for index, p in enumerate(paths):
        stack_name = info[p][0]
        siblings = stacks[stack_name]
        shared = set(raw_inputs[siblings[0]]).intersection(*(raw_inputs[s] for s in siblings[1:]))
        params, carried, side = [], [], []
        for a in raw_inputs[p]:
            if a.op == "placeholder" and _is_module_state(a) and _belongs_to(a, p):
                params.append(a)
            elif a in shared:
                side.append(a)
            else:
                carried.append(a)
        outputs = tuple(n for n in members[p] if any(u not in node_sets[p] for u in n.users))
        if not outputs:
            raise BlockDiscoveryError(f"{p} produces nothing that the rest of the graph reads")
        blocks.append(Block(index=index, path=p, stack=stack_name, module_type=info[p][1],
                            nodes=tuple(members[p]), params=tuple(params), carried=tuple(carried),
                            side=tuple(side), outputs=outputs))
    return BlockStack(blocks=tuple(blocks))


def _is_module_state(placeholder: fx.Node) -> bool:
    """A lifted parameter or buffer, not a user input (which also carries the module stack
    of the first module that reads it): see ``passes.inputs.is_module_state``."""
    return is_module_state(placeholder.name)


def _belongs_to(placeholder: fx.Node, path: str) -> bool:
    stack = placeholder.meta.get("nn_module_stack") or {}
    return any(module_path(raw) == path or module_path(raw).startswith(path + ".")
               for raw, _ in stack.values())
