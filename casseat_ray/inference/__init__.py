"""Every model call of the project in one place: the prompts of a run and the conversation
turns built from them (``turns``), the inference modes as per-row coroutines (``modes``), and
the one Ray Data actor class that owns an engine and keeps many rows in flight on it
(``stage``). Synthesis (teacher, student filter, judge) and evaluation all call models
through here, so the student is evaluated on exactly the turns it was trained on.
"""
