"""Your own label set: a VOC-format folder with `classes.txt` next to JPEGImages/ (`--dataset folder`).

classes.txt holds one class a line; the line's index (0-based) is the label value in SegmentationClass/:

    background
    road 128 64 128
    traffic light 250 170 30

A line is `name` or `name R G B` (a colour, three integers 0..255, for masks, TensorBoard and predict; a class
without one gets VOC's colour of its index). Names may hold spaces; a line whose last word is a number must end
with a full colour. 255 stays "ignore" in the label PNGs, so at most 255 classes.
"""
from pathlib import Path

from data.voc import IGNORE_INDEX, DataError, voc_colour

CLASSES_FILE = "classes.txt"
LINE_FORMAT = "`name` or `name R G B` (R, G, B integers 0..255)"


def parse_line(path: Path, number: int, line: str) -> tuple[str, tuple[int, int, int] | None]:
    """One classes.txt line -> (name, colour or None); `number` is 1-based, for the message."""
    words = line.split()
    where = f"{path}: line {number} ({line.strip()!r})"
    if not words:
        raise DataError(f"{path}: line {number} is empty: every line up to the last class is one class "
                        f"(its line index is its label value)")
    if not words[-1].lstrip("-").isdigit():
        return " ".join(words), None
    if len(words) < 4 or not all(w.lstrip("-").isdigit() for w in words[-3:]):
        raise DataError(f"{where}: expected {LINE_FORMAT}; a name ending in a number needs a colour after it")
    colour = tuple(int(w) for w in words[-3:])
    if not all(0 <= c <= 255 for c in colour):
        raise DataError(f"{where}: colour {colour} outside 0..255")
    return " ".join(words[:-3]), colour


def read_classes(root: str | Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """(names, colours) from root/classes.txt, one per label value; DataError naming the file and line."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found. --dataset folder needs a classes.txt next to JPEGImages/, one class "
                        f"name a line (line index = label value), each {LINE_FORMAT}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
    while lines and not lines[-1].strip():  # trailing blank lines are not classes
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty: expected one class a line, each {LINE_FORMAT}")
    if len(lines) > IGNORE_INDEX:
        raise DataError(f"{path}: {len(lines)} classes; at most {IGNORE_INDEX} (label value {IGNORE_INDEX} "
                        f"means ignore)")
    names, colours, seen = [], [], {}
    for index, line in enumerate(lines):
        name, colour = parse_line(path, index + 1, line)
        if name in seen:
            raise DataError(f"{path}: line {index + 1}: class {name!r} already on line {seen[name] + 1}")
        seen[name] = index
        names.append(name)
        colours.append(colour or voc_colour(index))
    return tuple(names), tuple(colours)
