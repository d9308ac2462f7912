FROM busybox
COPY <<A <<B /dir/
foo
A
bar
B
