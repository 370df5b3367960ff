"""Ground floor shared by every wing: LVLM families as data, the VLRM model classes, processor loading.

Nothing here imports ``merge``, ``reward`` or anything above; ``modeling`` registers the VLRM classes
with ``AutoModelForSequenceClassification`` when imported.
"""
