FROM scratch
ADD {{HTTP}}/data.txt /d/
