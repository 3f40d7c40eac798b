"""Hub model cards for SEA models (`card`), their plots (`plots`) and publishing (`push`)."""
