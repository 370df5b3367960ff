"""Studies that measure RL with merged rewards against ShapesWorld's gold judgement (``vlrm-rlhf study ...``)."""
