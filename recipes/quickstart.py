"""Quick start: train LoRA experts with SensitivityCallback, merge them with and without Sens-Merging.

    python recipes/quickstart.py            # built-in toy suite, CPU, about 2 minutes (1 thread)
    python recipes/quickstart.py --quick    # fewer steps and test examples (a smoke run)

The code lives in :mod:`sens_peft.demo` (so that ``sens-peft demo`` works from a wheel install); this file runs it
with the same arguments and prints the same table. See ``python recipes/quickstart.py --help``.
"""

from sens_peft.demo import main

if __name__ == "__main__":
    main()
