"""
What an edit of train.py changes on the device the runs are on: train.py reduced to what runs there (its syntax
tree without comments or layout, the small-compute block `if DEVICE_TYPE != "cuda":` taken or dropped), so that an
edit a run cannot tell apart from the current train.py is sent back to the agent before it is paid for.
"""

import ast

DEVICE_OVERRIDE = "DEVICE_TYPE != 'cuda'"  # the test of train.py's `if` block of small-compute values


def _loads(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _assigned(statement):
    """The names a plain `NAME = value` (no call in value) binds, else None."""
    if (isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets)
            and not any(isinstance(n, ast.Call) for n in ast.walk(statement.value))):
        return {t.id for t in statement.targets}
    return None


def small_compute_block(body):
    """Where the module's `if DEVICE_TYPE != "cuda":` block is, or None."""
    return next((i for i, node in enumerate(body)
                 if isinstance(node, ast.If) and ast.unparse(node.test) == DEVICE_OVERRIDE), None)


def as_run(source, device_type):
    """(train.py as it runs on device_type: its syntax tree, without comments or layout, with the small-compute
    block `if DEVICE_TYPE != "cuda":` taken or dropped, and the top-level assignments that block replaces dropped;
    the names it replaces). Two sources a run cannot tell apart give the same tree."""
    body = ast.parse(source).body
    at = small_compute_block(body)
    if at is None:
        return ast.dump(ast.Module(body, [])), set()
    block = body[at]
    if device_type == "cuda":
        return ast.dump(ast.Module(body[:at] + block.orelse + body[at + 1:], [])), set()
    replaced, read = set(), set()  # read: names the block reads before it sets them
    for statement in block.body:
        read |= _loads(statement) - replaced
        replaced |= _assigned(statement) or set()
    before = []
    for statement in reversed(body[:at]):  # an assignment the block replaces, unread in between, does nothing
        names = _assigned(statement)
        if not (names and names <= replaced and not names & read):
            before.append(statement)
            read |= _loads(statement)
    return ast.dump(ast.Module(before[::-1] + block.body + body[at + 1:], [])), replaced


def _top_level_values(source):
    values = {}
    for statement in ast.parse(source).body:
        for name in _assigned(statement) or ():
            values.setdefault(name, ast.dump(statement.value))  # the first: the hyperparameter block's
    return values


def no_effect(source, new_source, device_type):
    """What the agent is told when new_source would run on device_type exactly as source does, else None.
    device_type: "cuda", another device, or a function that says which: asked only when either source has the
    small-compute block."""
    if callable(device_type):
        blocks = any(small_compute_block(ast.parse(text).body) is not None for text in (source, new_source))
        device_type = device_type() if blocks else "any device"  # without the block, each runs the same
    then, now = as_run(source, device_type), as_run(new_source, device_type)
    if then[0] != now[0]:
        return None
    old, new = _top_level_values(source), _top_level_values(new_source)
    unseen = sorted(name for name in now[1] if old.get(name) != new.get(name))
    if unseen:
        return (f"Nothing was applied: the runs are on {device_type}, not CUDA, where the `if {DEVICE_OVERRIDE}:` "
                f"block sets {', '.join(unseen)} again, so this edit changes nothing a run does. Edit the values in "
                "that block instead.")
    return (f"Nothing was applied: on {device_type} this edit changes nothing a run does (only comments or layout, "
            "or code that does not run there" + (f", such as the `if {DEVICE_OVERRIDE}:` block"
                                                 if device_type == "cuda" else "") + ").")
