"""The tools users run on what the pipeline made, none of them a stage: `make chat` (`chat`),
`make serve` (`serve`, held to the OpenAI API by `openai_api`), `make sweep` (`sweep`) and SLURM
sweeps (`slurm`), the offline plots page (`plots`), and the configuration reference (`reference`)."""
