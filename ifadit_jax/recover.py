"""python -m ifadit_jax.recover INPUT OUTPUT --weights DIR [--secret-file F | --secret-env VAR]

Recovers images written by `python -m ifadit_jax.anonymize`, using their JSON sidecars.
"""

from ifadit_jax import cli


def main(argv):
    cli.refuse_secret_on_command_line(argv)  # before JAX and the weights load
    from ifadit_jax.commands import recover_main

    return recover_main(argv)


if __name__ == "__main__":
    cli.run(main)
