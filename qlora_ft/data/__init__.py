"""The data road, one module per stage, each importing only the stages before it:

sources   bytes -> rows: one reader per format, streamed where the format allows (pickles: unpickle, restricted)
records   rows -> paragraphs (the heading rule) | instruction records | chat conversations, checked
encode    records -> (token ids, loss mask) through the template; inference prompts the same way
cache     every mode's ids and masks, tokenized once and kept as memory maps
split     which records train and which validate: one type, a pure function of (data, seed, share)
batches   windows, the epoch plan (packing or padding) and the one batch builder
prepare   the road end to end: a run's training and validation data, and eval's held-out set
"""
