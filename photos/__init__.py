"""What a photo becomes, without Spark: folders walked (walk.py), age labels read from file names
(labels.py), faces detected, aligned and cropped (faces.py: the ONE crop function prepare, score and
predict share), subjects assigned to splits (splits.py), and synthetic faces for demos and tests
(synthetic.py). spark_jobs runs these inside Spark tasks; trainer never needs them."""
