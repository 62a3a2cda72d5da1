"""The bad-input probe: malformed and adversarial inputs at every data entry point, tallied by outcome.

`harness.py` holds the outcomes, the `Probes` collector and the command (`python benchmarks/probes`, see its
docstring); each other module holds the cases of one entry point (`convert_cli`, `saved_datasets`,
`processor_collators`, `model_inputs`, `evaluation_cache`, `retrieval_scripts`, `pretrain_script`).
"""
