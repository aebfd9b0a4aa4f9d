"""Composer's Trainer starts a Python subprocess at every rank's start to learn a name it discards.

`Trainer.__init__` (Composer 0.32.1) calls `get_composer_env_dict()` and logs two of its keys,
`composer_version` and `composer_commit_hash`. Building the dict also asks py-cpuinfo for the CPU's
model name, and py-cpuinfo reads it by starting `python cpuinfo.py --json` in a subprocess: ~1 s of
each rank's start-up (0.8 CPU-s measured on a 2-core CI machine), once per rank, for a value the
Trainer never reads. `skip_cpu_model_probe` gives the Trainer the two keys it reads, without the
subprocess.
"""

from __future__ import annotations

from dbrx_train import compat


def skip_cpu_model_probe() -> None:
    """Idempotent; the Trainer still logs composer_version and composer_commit_hash."""
    import composer.trainer.trainer as trainer_module
    from composer.utils import collect_env

    def composer_env_dict() -> dict:
        return {
            "composer_version": collect_env.get_composer_version(),
            "composer_commit_hash": collect_env.get_composer_commit_hash(),
        }

    compat.replace("composer_env_cpu_probe", trainer_module, "get_composer_env_dict", composer_env_dict)
