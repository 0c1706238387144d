"""The built-in tasks' declarations, one module per task: parameters (types, ranges,
defaults), metrics (units), objective, smoke budget, rules and data checks, and where the
implementation lives. Nothing here imports torch: listing, validating and reviewing tasks
(`bench list`, `bench validate`, `bench board`, the checks of `bench run`) read these alone.
"""
