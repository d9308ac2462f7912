FROM scratch
COPY <<one.txt <<two.txt /d/
first
one.txt
second
two.txt
