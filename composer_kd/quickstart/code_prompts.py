"""Prompts made from local source code, for on-policy distillation offline: each function of the given Python
files becomes a prompt (its signature and the first line of its docstring) and a response (the next lines of its
body), as ``.jsonl`` records ``{"prompt", "response"}`` that ``prepare-data --prompts`` reads."""

import ast
import json
from typing import Iterator, Sequence

__all__ = ['function_prompts', 'write_function_prompts']


def function_prompts(files: Sequence[str], body_lines: int = 4, limit: int | None = None) -> Iterator[dict[str, str]]:
    """``{"prompt", "response"}`` for each function (in file order): the prompt is the ``def`` line(s) up to the
    colon, the response the next ``body_lines`` lines of the function."""
    count = 0
    for path in files:
        with open(path, encoding='utf-8', errors='replace') as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            body_start = node.body[0].lineno - 1
            prompt = '\n'.join(lines[node.lineno - 1:body_start]) + '\n'
            response = '\n'.join(lines[body_start:min(body_start + body_lines, node.end_lineno or body_start + 1)])
            if prompt.strip() and response.strip():
                yield {'prompt': prompt, 'response': response + '\n'}
                count += 1
                if limit is not None and count >= limit:
                    return


def write_function_prompts(files: Sequence[str], out: str, body_lines: int = 4, limit: int | None = None) -> int:
    """Writes ``function_prompts`` to the ``.jsonl`` file ``out``; returns the number of records."""
    n = 0
    with open(out, 'w', encoding='utf-8') as f:
        for record in function_prompts(files, body_lines, limit):
            f.write(json.dumps(record) + '\n')
            n += 1
    return n
