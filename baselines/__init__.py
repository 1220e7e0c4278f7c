"""Baseline methods: one file each, discovered automatically (see README, "Add your own baseline")."""
