"""python -m ifadit_jax.anonymize INPUT OUTPUT --weights DIR [--secret-file F | --secret-env VAR]

Anonymizes one image, a folder (the output mirrors the tree), or in-the-wild photos with any
number of faces. See `ifadit_jax.faces` for the importable functions and `--help` for options.
"""

from ifadit_jax import cli
from ifadit_jax.faces import anonymize_main

if __name__ == "__main__":
    cli.run(anonymize_main)
