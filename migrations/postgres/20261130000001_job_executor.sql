-- Which executor ran (or runs) a job: its host and device, e.g. `gpu-node-1 (cuda:0)`.
ALTER TABLE fine_tuning_jobs ADD COLUMN executor TEXT;
