"""The pipeline's parts, one module a concern; the numbered scripts and common.py import from here.

knobs and records are the torch-free layer every stage reads and writes through; riddles holds the text
rules, message_stage and judge the writers of stages 02-04b, dedup the reworded-riddle check of 03,
datacard the data card, engine and kernels the GPU generation engine, training stage 05's student and
loss, evaluation stage 07's report, shapes the rehearsal's random models of the real shapes.
"""
