"""python -m ifadit_jax.recover INPUT OUTPUT --weights DIR [--secret-file F | --secret-env VAR]

Recovers images written by `python -m ifadit_jax.anonymize`, using their JSON sidecars.
"""

from ifadit_jax import cli
from ifadit_jax.faces import recover_main

if __name__ == "__main__":
    cli.run(recover_main)
