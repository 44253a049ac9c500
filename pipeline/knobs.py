"""The knobs of every script: UPPER_CASE constants at its top, overridden as --name=value.

configure(globals()) applies the command line to them: types follow the defaults, numbers must
lie in KNOB_RANGES, secrets print as '***', --help lists them with their comments. InputError
is the pipeline's one-line error (exit 2, no traceback). common.py re-exports all three.
"""

import re
import string
import sys
from pathlib import Path


class InputError(Exception):
    """Bad input or setup: reported as one line and exit code 2, no traceback."""


# Allowed values of the numeric knobs, by name (a name means one thing in every stage), in interval notation:
# [ ] include the bound, ( ) exclude it. configure checks defaults and overrides alike, so a value out of range
# is one line before anything runs (a test checks that every numeric knob of 01-07 is here).
KNOB_RANGES = {
    "NUM_PROMPTS": "[1, inf)", "K": "[1, inf)", "BATCH_SIZE": "[1, inf)", "MAX_NEW_TOKENS": "[1, inf)",
    "TEMPERATURE": "[0, inf)", "TOP_P": "(0, 1]", "SEED": "[0, 4294967295]", "MIN_WORDS": "[0, inf)",
    "MAX_CHARS": "[1, inf)", "NEAR_DUP": "(0, 1]", "MAX_WORDS": "[1, inf)", "MAX_LENGTH": "[1, inf)",
    "EVAL_FRACTION": "[0, 1)", "GRADIENT_CHECKPOINTING": "[0, 1]", "LORA_R": "[1, inf)", "LORA_ALPHA": "(0, inf)",
    "LORA_DROPOUT": "[0, 1)", "TOKENS_PER_BATCH": "[1, inf)", "GRAD_ACCUM": "[1, inf)", "LR": "(0, inf)",
    "WARMUP_STEPS": "[0, inf)", "WEIGHT_DECAY": "[0, inf)", "GRAD_CLIP": "[0, inf)", "EPOCHS": "[1, inf)",
    "MAX_STEPS": "[0, inf)", "EVALS_PER_EPOCH": "[0, inf)", "SAVE_EVERY_STEPS": "[0, inf)",
    "KEEP_CHECKPOINTS": "[1, inf)", "LOG_EVERY": "[1, inf)", "MERGE_TOLERANCE": "(0, inf)", "LIMIT": "[0, inf)",
    "N_CHOICES": "[2, inf)", "SAMPLES": "[0, inf)", "MIN_SCORE": "[1, 5]", "DEDUP_TRICK_MIN": "(0, 1]",
    "DEDUP_ANSWER_MIN": "(0, 1]",
    "WIN_RATE_N": "[0, inf)", "JUDGE_MAX_NEW_TOKENS": "[1, inf)", "JUDGE_BATCH_SIZE": "[1, inf)",
}
# Knobs whose value is never printed or written (API_KEY, HF_TOKEN, ...): the override line shows '***'.
SECRET_KNOB = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD)$")


def in_range(value, interval):
    """Whether a number lies in an interval written like "[0, 1)" (nan never does)."""
    low_kind, low, high, high_kind = re.fullmatch(r"([\[(])(.+), (.+)([\])])", interval).groups()
    low, high = float(low), float(high)
    return ((low <= value) if low_kind == "[" else (low < value)) and \
        ((value <= high) if high_kind == "]" else (value < high))


def _excepthook(kind, err, tb, _default=sys.excepthook):
    if issubclass(kind, InputError):
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _default(kind, err, tb)


def _parse_value(name, text, default):
    """Turn the command-line text into the type of the knob's default."""
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--{name.lower().replace('_', '-')} wants true or false, got {text!r}")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "an int" if isinstance(default, int) else "a float"
        raise InputError(f"--{name.lower().replace('_', '-')} wants {kind}, got {text!r}") from None
    if isinstance(default, (list, tuple)):
        return type(default)(x.strip() for x in text.split(",") if x.strip())
    if default is None and text.lower() == "none":
        return None
    return text


def _knob_comments(path):
    """Map knob name -> (source text of its default, trailing comment)."""
    found = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if m:
            found[m.group(1)] = (m.group(2), m.group(3) or "")
    return found


def configure(knobs, argv=None):
    """Apply `--name=value` (or `--name value`) overrides to a script's UPPER_CASE knobs.

    Call as `configure(globals())` right after the knob block. `--help` lists the knobs;
    unknown names, wrong types and numbers outside KNOB_RANGES are errors; a bare `--flag`
    sets a boolean knob true. Secret knobs (SECRET_KNOB) are printed as '***'.
    """
    sys.excepthook = _excepthook
    argv = sys.argv[1:] if argv is None else list(argv)
    script = knobs.get("__file__", "script")
    comments = _knob_comments(script) if Path(script).exists() else None  # None: no source to read
    names = [k for k, v in knobs.items() if k.isupper() and not k.startswith("_")
             and (v is None or isinstance(v, (bool, int, float, str, list, tuple)))
             and (comments is None or k in comments)]  # assigned in the script, not imported into it
    if "-h" in argv or "--help" in argv:
        print((knobs.get("__doc__") or "").strip() + "\n\nknobs (--name=value):")
        comments = comments or {}
        for k in names:
            source, comment = comments.get(k, (repr(knobs[k]), ""))
            flag = "--" + k.lower().replace("_", "-")
            print(f"  {flag:<28} {source:<28} {comment}")
        sys.exit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            raise InputError(f"unexpected argument {arg!r}: knobs are set as --name=value (see --help)")
        flag, eq, text = arg[2:].partition("=")
        name = flag.upper().replace("-", "_")
        if name not in names:
            raise InputError(f"unknown knob --{flag} (see --help)")
        default = knobs[name]
        if not eq:
            if isinstance(default, bool):
                text = "true"
            elif i < len(argv):
                text, i = argv[i], i + 1
            else:
                raise InputError(f"--{flag} needs a value")
        knobs[name] = _parse_value(name, text, default)
        shown = "'***'" if SECRET_KNOB.search(name) and knobs[name] else repr(knobs[name])
        print(f"override: {name} = {shown}")
    for name in names:
        value, interval = knobs[name], KNOB_RANGES.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if interval and number and not in_range(value, interval):
            raise InputError(f"--{name.lower().replace('_', '-')} must be in {interval}, got {value!r}")


def check_template(knob, template, *fields):
    """Refuse a prompt knob that does not use exactly these {fields}: a typo would fail mid-run, a missing
    field would silently leave the riddle out of every prompt."""
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise InputError(f"--{knob}: {e}") from None
    if used != set(fields):
        want = ", ".join("{" + f + "}" for f in fields)
        raise InputError(f"--{knob} must use {want} and no other {{field}} (write {{{{ for a brace); "
                         f"it uses {', '.join('{' + f + '}' for f in sorted(used)) or 'none'}")
