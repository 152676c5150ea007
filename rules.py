"""Value rules: the range of each setting, written once, beside the settings object that
owns it (TrainConfig, BertConfig, Masking, ...), which checks itself with check().
flags.py names a broken rule by its flag: `--lr -1.0: must be > 0`."""

import math


class SettingError(ValueError):
    """A setting outside its range: `name value: requirement`."""

    def __init__(self, name, value, requirement):
        self.name, self.value, self.requirement = name, value, requirement
        # As typed on a command line: --betas 0.9 1.5, not (0.9, 1.5).
        self.shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        super().__init__(f"{name} {self.shown}: {requirement}")


def finite(x):
    return x is not None and not isinstance(x, bool) and math.isfinite(x)


def positive(x):
    return finite(x) and x > 0


def at_least(n):
    return lambda x: x >= n


def fraction(x):  # [0, 1)
    return finite(x) and 0 <= x < 1


def one_of(*choices):
    return lambda x: x in choices


def check(obj, rules):
    """SettingError for the first field of `obj` that breaks its rule; None skips a field
    (not given: it comes from elsewhere, e.g. a checkpoint)."""
    for name, (ok, requirement) in rules.items():
        value = getattr(obj, name)
        if value is not None and not ok(value):
            raise SettingError(name, value, requirement)
