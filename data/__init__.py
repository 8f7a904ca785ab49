"""The data a run trains on: files of records (sources), conversations through the chat template
(chat), examples packed into one global stream of sequences (stream), preference pairs as two
sequences each (pairs), the data flags (config) and a look at a mix before training (preview)."""
