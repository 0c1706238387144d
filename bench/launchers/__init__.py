"""Launchers: ways to start `bench run` workers elsewhere (Slurm), above the backends."""
