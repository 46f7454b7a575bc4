"""The engines pixicache drives: py-rattler (:mod:`.rattler`) and the Pixi binary (:mod:`.pixi`).

Installers (:mod:`pixicache.installers`) and the task runner use them; neither
backend knows about installers, the agent or the CLI.
"""
