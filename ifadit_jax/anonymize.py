"""python -m ifadit_jax.anonymize INPUT OUTPUT --weights DIR [--secret-file F | --secret-env VAR]

Anonymizes one image, a folder (the output mirrors the tree), or in-the-wild photos with any
number of faces. See `ifadit_jax.commands` for the importable functions and `--help` for options.
"""

from ifadit_jax import cli


def main(argv):
    cli.refuse_secret_on_command_line(argv)  # before JAX and the weights load
    from ifadit_jax.commands import anonymize_main

    return anonymize_main(argv)


if __name__ == "__main__":
    cli.run(main)
