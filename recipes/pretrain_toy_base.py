"""Rebuild the toy base shipped with the package (``sens_peft/testing/data/toy_base``).

    python recipes/pretrain_toy_base.py                    # pre-train from scratch (1-3 min on CPU), write it
    python recipes/pretrain_toy_base.py --from-cache DIR   # ship an already pre-trained base folder instead

The quick start, the tests and the quality benchmark's ``maps``/B base load this copy instead of pre-training
(:func:`sens_peft.testing.toy.pretrain_base`). Rebuild it after any change of the toy data, model or
pre-training: ``tests/test_shipped_base.py`` fails until the shipped digest, data fingerprint and weights match
what the code computes. Pre-training runs on one thread, which makes it bit-for-bit reproducible on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging

from sens_peft.testing import toy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=str(toy.SHIPPED_BASE_DIR), help="where to write it (default: the package)")
    p.add_argument("--from-cache", default=None,
                   help="a folder pretrain_base() cached for the default settings (no pre-training)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.from_cache:
        manifest = toy.write_shipped_base(args.from_cache, args.dest)
    else:
        manifest = toy.rebuild_shipped_base(args.dest, progress=True)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
