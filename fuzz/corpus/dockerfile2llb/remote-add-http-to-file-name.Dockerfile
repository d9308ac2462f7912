FROM scratch
ADD {{HTTP}}/data.txt /renamed.txt
