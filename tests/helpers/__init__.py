"""Helpers shared by the tests: tiny models and their diffusers twins (models), pipelines compared with diffusers'
(pipelines), the command line as a user runs it (cli), kernel tolerances (kernels). Importing them needs neither
diffusers nor a GPU: the helpers that need diffusers skip the calling test when it is missing (`require_diffusers`)."""
