"""jsonargparse's validation errors as one line naming the key, the value and what is allowed.

jsonargparse reports a bad value of a subclass-mode argument as a nested tree ("Does not validate against any of
the Union subtypes ... Problem with given class_path ... Parser key ..."). Its error objects carry no structure to
read instead, so the tree's text is read here; a message in no known shape is returned as its first line.
"""

from __future__ import annotations

import re

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED_GOT = re.compile(r"Expected (?:a |an )?(.+?)\. Got value: (.*)")
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
_GIVEN = re.compile(r"Given value: (.*)")
_NESTED = re.compile(r"NestedArg\(key='([^']+)', val=(.*)\)$")
_IMPORT_PATH = re.compile(r"Expected a dot import path string: (.*)")


def readable_type(text: str) -> str:
    """`<class 'int'>` -> int, `<class 'NoneType'>` -> null, `typing.Literal['a', 'b']` -> one of 'a', 'b'."""
    text = text.strip()
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    cls = re.fullmatch(r"<class '([^']+)'>", text)
    if cls:
        name = cls.group(1).rsplit(".", 1)[-1]
        return "null" if name == "NoneType" else name
    return text


def _split_subtypes(text: str) -> list[str]:
    """Split a Subtypes list at top-level commas (Literal[...] holds commas of its own)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in [*parts, current] if p.strip()]


def one_line(message: str) -> str:
    """The error as `<key> = <value>: expected <allowed>` (or the first line when it has no known shape)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    keys = _KEY.findall(message)
    if not keys:
        return lines[0]
    key = keys[0]
    problem = _CLASS_PROBLEM.search(message)
    if problem:
        class_name = problem.group(1).rsplit(".", 1)[-1]
        inner = message[problem.end() :]
        not_accepted = _NOT_ACCEPTED.search(inner)
        if not_accepted:
            return f"{key}.init_args.{not_accepted.group(1)} is not an argument of {class_name}"
        inner_keys = _KEY.findall(inner)
        got = _EXPECTED_GOT.search(inner)
        if inner_keys and got:
            return (
                f"{key}.init_args.{inner_keys[0]} = {got.group(2)!s}: expected {readable_type(got.group(1))}"
            )
    import_path = _IMPORT_PATH.search(message)
    if import_path:
        return (
            f"{key}.class_path = {import_path.group(1).strip()}: expected an import path of a class "
            "(package.module.Class)"
        )
    got = _EXPECTED_GOT.search(message)
    if got:
        return f"{key} = {got.group(2)}: expected {readable_type(got.group(1))}"
    subtypes = _SUBTYPES.search(message)
    given = _GIVEN.findall(message)
    if subtypes and given:
        value = given[-1].strip()
        nested = _NESTED.match(value)
        if nested:
            key, value = f"{key}.{nested.group(1)}", nested.group(2)
        allowed = " or ".join(readable_type(t) for t in _split_subtypes(subtypes.group(1)))
        return f"{key} = {value}: expected {allowed}"
    rest = " ".join(lines)[len(f'Parser key "{key}":') :].strip() if lines[0].startswith("Parser key") else ""
    return f"{key}: {rest}" if rest else " ".join(lines)
