"""Imported first by every script in launch/: this checkout's root goes first on the import path, so that
``python launch/train.py`` runs the dpo_dist beside it (installed or not), and the launch folder, which Python puts
there for a script, leaves it, so that no script here shadows a package (``import evaluate`` must find Hugging
Face's evaluate, not launch/evaluate.py)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]
sys.path.insert(0, os.path.dirname(HERE))
