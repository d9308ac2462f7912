FROM scratch
ADD a.txt /add/
