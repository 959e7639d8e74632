"""Conditional regions of an exported graph: gamma-MoD's decode gate as an ONNX ``If``.

When no row of a decode step passes a gamma-MoD layer's gate, the layer's attention and MLP must
not run. ``torch.cond`` expresses that, but tracing it costs tens of seconds of symbolic-shape work
per layer; so the layer is traced straight through, between marker ops:

* ``gate_enter(x, cond, group)`` on every tensor the region reads;
* ``gate_exit(then_value, else_value, cond, group)`` on every tensor it produces.

:func:`wrap_gates` then turns each group into one ``If``: the nodes that depend on the group's
entries and feed its exits move into the then-branch (weights and other outer values are read from
the enclosing graph, as ONNX allows), the else-branch passes the ``else_value``\\ s through, and
the markers disappear. Eager PyTorch never runs the markers: the model skips the layer in Python.
"""

from __future__ import annotations

import functools

import torch

DOMAIN = "gammamod.gate"  # the markers' domain: never in a written graph


@torch.library.custom_op("gammamod::gate_enter", mutates_args=())
def gate_enter(x: torch.Tensor, cond: torch.Tensor, group: int) -> torch.Tensor:
    return x.clone()


@gate_enter.register_fake
def _(x, cond, group):
    return torch.empty_like(x)


@torch.library.custom_op("gammamod::gate_exit", mutates_args=())
def gate_exit(then_value: torch.Tensor, else_value: torch.Tensor, cond: torch.Tensor, group: int) -> torch.Tensor:
    return (then_value if bool(cond) else else_value).clone()


@gate_exit.register_fake
def _(then_value, else_value, cond, group):
    return torch.empty_like(then_value)


@functools.cache
def _register_schemas() -> None:
    from onnx import defs

    from .ops import register_schemas

    fp, attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    any_tensor = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int64)", "tensor(int32)",
                  "tensor(bool)"]
    register_schemas((
            defs.OpSchema("GateEnter", DOMAIN, 1, inputs=[fp("x", "T"), fp("cond", "tensor(bool)")],
                          outputs=[fp("y", "T")], type_constraints=[("T", any_tensor, "")],
                          attributes=[attr("group", defs.OpSchema.AttrType.INT, "")]),
            defs.OpSchema("GateExit", DOMAIN, 1, inputs=[fp("a", "T"), fp("b", "T"), fp("cond", "tensor(bool)")],
                          outputs=[fp("y", "T")], type_constraints=[("T", any_tensor, "")],
                          attributes=[attr("group", defs.OpSchema.AttrType.INT, "")])))


def translation_table() -> dict:
    import onnxscript

    _register_schemas()
    gate = onnxscript.values.Opset(DOMAIN, 1)

    def enter(x, cond, group: int):
        return gate.GateEnter(x, cond, group=group)

    def exit_(then_value, else_value, cond, group: int):
        return gate.GateExit(then_value, else_value, cond, group=group)

    return {torch.ops.gammamod.gate_enter.default: enter, torch.ops.gammamod.gate_exit.default: exit_}


def wrap_gates(model) -> int:
    """Replace every marked region of an ``onnx_ir`` model by an ``If``; returns how many."""
    import onnx_ir as ir

    graph = model.graph
    groups: dict[int, dict] = {}
    for node in graph:
        if node.domain == DOMAIN:
            g = groups.setdefault(node.attributes["group"].as_int(), {"enter": [], "exit": []})
            g["enter" if node.op_type == "GateEnter" else "exit"].append(node)
    order = {id(n): i for i, n in enumerate(graph)}
    for group, g in sorted(groups.items()):
        enters, exits = g["enter"], g["exit"]
        cond = exits[0].inputs[2]
        # the region: nodes reachable from the entries that feed the exits' then-values
        forward, stack = set(), [e.outputs[0] for e in enters]
        while stack:
            for use in stack.pop().uses():
                node = use.node
                if node.domain == DOMAIN or id(node) in forward:
                    continue
                forward.add(id(node))
                stack.extend(node.outputs)
        region, stack = {}, [x.inputs[0] for x in exits]
        while stack:
            value = stack.pop()
            node = value.producer() if value is not None else None
            if node is None or id(node) not in forward or id(node) in region:
                continue
            region[id(node)] = node
            stack.extend(node.inputs)
        inside = {id(n) for n in region.values()} | {id(e) for e in enters}
        for node in region.values():
            for out in node.outputs:
                for use in out.uses():
                    if id(use.node) not in inside and use.node not in exits:
                        raise RuntimeError(f"gate {group}: {node.op_type} '{node.name}' feeds a node outside the "
                                           f"region ({use.node.op_type} '{use.node.name}')")
        nodes = sorted(region.values(), key=lambda n: order[id(n)])
        for e in enters:  # the entries are plain values inside the branch
            e.outputs[0].replace_all_uses_with(e.inputs[0])
        then_outs, else_nodes, else_outs = [], [], []
        for x in exits:
            then_value, else_value = x.inputs[0], x.inputs[1]
            if then_value.producer() is None or id(then_value.producer()) not in region:
                passthrough = ir.node("Identity", [then_value], name=f"gate{group}_then_{len(then_outs)}")
                nodes.append(passthrough)
                then_value = passthrough.outputs[0]
            then_outs.append(then_value)
            ident = ir.node("Identity", [else_value], name=f"gate{group}_else_{len(else_outs)}")
            else_nodes.append(ident)
            else_outs.append(ident.outputs[0])
        for node in nodes:
            if node.graph is graph:
                graph.remove(node)
        then_branch = ir.Graph([], then_outs, nodes=nodes, name=f"gate{group}_run")
        else_branch = ir.Graph([], else_outs, nodes=else_nodes, name=f"gate{group}_skip")
        last = max(exits, key=lambda n: order[id(n)])
        if_node = ir.node("If", [cond], {"then_branch": then_branch, "else_branch": else_branch},
                          num_outputs=len(exits), name=f"gate{group}")
        graph.insert_before(last, if_node)
        for x, out in zip(exits, if_node.outputs):
            out.name = x.outputs[0].name
            out.shape, out.type = x.outputs[0].shape, x.outputs[0].type
            x.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        for node in exits + enters:
            graph.remove(node, safe=True)
    return len(groups)
