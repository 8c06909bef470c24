"""Text that comes from outside (a checkpoint's records, file names, error messages) made safe for
where it is shown: one terminal line, a shell command line, a Markdown model card.

A checkpoint can record any string as a training argument, and a file name can hold any character
but ``/``: written as they are they could break a line, move a terminal's cursor, or add headings
and raw HTML to a model card someone then publishes.
"""
import html
import re
import shlex
from typing import Optional

__all__ = ['code_block', 'code_span', 'first_line', 'one_line', 'shell_word', 'utf8_path_problem']

_LINE_BREAK = re.compile(r'\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]\s*')  # with the whitespace around it
_BACKTICKS = re.compile(r'`+')


def one_line(text: str) -> str:
    """``text`` as one printable line: a line break and the whitespace around it become one space,
    a tab a space, other characters that are not printable (control and escape sequences,
    direction overrides, bytes of an undecodable file name) their backslash escapes."""
    return ''.join(_escaped(c) for c in _LINE_BREAK.sub(' ', text).strip())


def first_line(error: BaseException) -> str:
    """The first line of an error's message (libraries add paragraphs of advice after it), or the
    error's type where it has none: what a one-line report can quote."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def utf8_path_problem(path: str) -> Optional[str]:
    """Why a path cannot be used, when its name holds bytes that are not UTF-8 (torch and safetensors
    open files by UTF-8 names only); None when it can."""
    try:
        path.encode('utf-8')
    except UnicodeEncodeError:
        return f'{one_line(path)}: the path is not valid UTF-8, and torch and safetensors open files only by UTF-8 paths'
    return None


def shell_word(text: str) -> str:
    """``text`` as one word of a POSIX shell command line."""
    return shlex.quote(one_line(text))


def code_span(text: str) -> str:
    """``text`` as Markdown inline code, which renders literally (no emphasis, links or HTML)."""
    text = one_line(text)
    fence = '`' * (_longest_backtick_run(text) + 1)
    padding = ' ' if text.startswith('`') or text.endswith('`') else ''
    return f'{fence}{padding}{text}{padding}{fence}'


def code_block(text: str) -> str:
    """``text`` as a preformatted block of a Markdown document, shown exactly and never markup: an HTML
    ``<pre>`` block, which Markdown passes on as it is, with HTML's ``&``, ``<`` and ``>`` as entities,
    so that nothing in it can end the block or be a tag (a fenced code block would show a ``<script>``
    as text too, but keep it raw in the file for every reader that is not a Markdown renderer)."""
    return f'<pre><code>{html.escape(text, quote=False)}</code></pre>'


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in _BACKTICKS.findall(text)), default=0)


def _escaped(char: str) -> str:
    if char.isprintable():
        return char
    if char == '\t':
        return ' '
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8 (os.fsdecode's surrogateescape)
        return f'\\x{code - 0xDC00:02x}'
    return char.encode('unicode_escape').decode('ascii')
