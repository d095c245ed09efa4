"""Partition plans: which devices compute which part of which layers, and how parts merge.

data (Plan, Stage, Chunk, Need, Swap), stages (groups of layers -> stages of chunks),
builders (the named plans, `build_plan`), auto (the cost-model planner), compute (split a
stage's inputs, compute a chunk, merge the results), exchange (strips swapping halo rows),
run (a plan run in one process exactly as the cluster runs it).
"""
from decolla.plans.builders import PLANS, build_plan, parse_plan_name
from decolla.plans.data import Chunk, Need, Plan, PlanError, Stage

__all__ = ["PLANS", "Chunk", "Need", "Plan", "PlanError", "Stage", "build_plan",
           "parse_plan_name"]
